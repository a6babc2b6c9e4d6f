"""The ``gblr`` command: a thin dispatcher to one module per subcommand."""

from __future__ import annotations

import importlib
import sys

#: subcommand -> (module with a ``main(argv)`` function, one-line help)
COMMANDS: dict[str, tuple[str, str]] = {
    "train": ("gblr.train.runner", "train a model with learned structure (Hydra experiments)"),
    "bench": ("gblr.bench.cli", "run the benchmarks and write RESULTS.md"),
    "compress": ("gblr.convert.cli", "compress a pretrained model, distil it, report and save"),
    "calibrate": ("gblr.bench.calibrate", "measure this device's GEMM times for the time model"),
}


def version() -> str:
    """The installed package's version (its metadata), else the source tree's."""
    from importlib.metadata import PackageNotFoundError
    from importlib.metadata import version as metadata_version

    try:
        return metadata_version("gblr")
    except PackageNotFoundError:
        return str(getattr(importlib.import_module("gblr"), "__version__", "unknown"))


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv and argv[0] in ("-V", "--version"):
        print(f"gblr {version()}")
        return 0
    if not argv or argv[0] in ("-h", "--help"):
        print("usage: gblr [--version] <command> [options]\n\ncommands:")
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
