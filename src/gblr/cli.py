"""The ``gblr`` command: a thin dispatcher to one module per subcommand."""

from __future__ import annotations

import importlib
import sys

#: subcommand -> (module with a ``main(argv)`` function, one-line help)
COMMANDS: dict[str, tuple[str, str]] = {
    "train": ("gblr.train.runner", "train a model with learned structure (Hydra experiments)"),
    "bench": ("gblr.bench.cli", "run the benchmarks and write RESULTS.md"),
    "compress": ("gblr.convert.cli", "compress a pretrained model, distil it, report and save"),
}


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] in ("-h", "--help"):
        print("usage: gblr <command> [options]\n\ncommands:")
        for name, (_, text) in sorted(COMMANDS.items()):
            print(f"  {name:<10} {text}")
        return 0
    name, rest = argv[0], argv[1:]
    if name not in COMMANDS:
        known = ", ".join(sorted(COMMANDS))
        print(f"gblr: unknown command {name!r}; known commands: {known}", file=sys.stderr)
        return 2
    module = importlib.import_module(COMMANDS[name][0])
    return int(module.main(rest) or 0)


if __name__ == "__main__":
    sys.exit(main())
