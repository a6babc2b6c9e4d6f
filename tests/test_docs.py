"""Every code block of README.md and docs/*.md is checked.

- A fenced ``python`` block runs, in a fresh namespace, in a temporary working directory,
  with one torch thread. A line ``# requires: transformers, lightning`` in the block names
  optional modules: the block is skipped (with the reason) only when one cannot be imported.
  Deprecation warnings raised by calls in the block are errors: the docs show the current API.
- A fenced ``bash`` block is parsed, command by command: ``gblr <command> ...``,
  ``python -m gblr...`` and ``bash scripts/...`` must name something that exists, and every
  ``--flag`` they use must appear in that command's ``--help``; ``gblr train key=value``
  lines must compose with the packaged Hydra configs (or at least name an existing
  experiment when Hydra is not installed). ``pip install`` and ``pytest`` lines are exempt.

Test ids are ``file:line`` of the block's first line.
"""

from __future__ import annotations

import contextlib
import functools
import importlib
import importlib.util
import io
import re
import shlex
import warnings
from dataclasses import dataclass
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parent.parent
DOC_FILES = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
FENCE = re.compile(r"^(`{3,})\s*([\w+-]*)\s*$")
REQUIRES = re.compile(r"^\s*#\s*requires:\s*(.+?)\s*$", re.MULTILINE)
SHELL_LANGS = ("bash", "sh", "shell", "console")
#: namespace name of a doc block (deprecation warnings attributed to it are errors)
BLOCK_MODULE = "gblr_doc_block"


@dataclass(frozen=True)
class Block:
    path: Path
    line: int  # 1-based line of the block's first code line
    lang: str
    code: str

    @property
    def id(self) -> str:
        return f"{self.path.relative_to(ROOT).as_posix()}:{self.line}"


def doc_blocks(path: Path) -> list[Block]:
    """The fenced code blocks of one Markdown file."""
    blocks: list[Block] = []
    lines = path.read_text(encoding="utf-8").splitlines()
    i = 0
    while i < len(lines):
        m = FENCE.match(lines[i])
        if m is None:
            i += 1
            continue
        fence, lang = m.group(1), m.group(2).lower()
        start, j = i + 1, i + 1
        while j < len(lines) and lines[j].strip() != fence:
            j += 1
        if j == len(lines):
            raise ValueError(f"{path}:{i + 1}: code fence is never closed")
        blocks.append(Block(path, start + 1, lang, "\n".join(lines[start:j]) + "\n"))
        i = j + 1
    return blocks


ALL_BLOCKS = [b for p in DOC_FILES if p.is_file() for b in doc_blocks(p)]
PYTHON_BLOCKS = [b for b in ALL_BLOCKS if b.lang in ("python", "py")]
SHELL_BLOCKS = [b for b in ALL_BLOCKS if b.lang in SHELL_LANGS]


def test_docs_have_blocks():
    assert (ROOT / "docs").is_dir(), "docs/ is missing"
    assert PYTHON_BLOCKS and SHELL_BLOCKS


def test_readme_keeps_the_two_commands():
    """CI and the project checker grep the README for these exact lines."""
    readme = (ROOT / "README.md").read_text(encoding="utf-8")
    for command in (
        'pip install torch==2.13.0 && pip install -e ".[train]" && gblr train '
        "experiment=mnist1d/compare",
        'pip install torch==2.13.0 && pip install -e ".[dev]" && pytest -q',
    ):
        assert command in readme
    assert len(readme.splitlines()) <= 250


def test_doc_links_resolve():
    """Relative links of README.md and docs/*.md point at files that exist."""
    link = re.compile(r"\]\(([^)#\s]+)(?:#[^)]*)?\)")
    missing = []
    for path in DOC_FILES:
        for target in link.findall(path.read_text(encoding="utf-8")):
            if "://" in target or target.startswith("mailto:"):
                continue
            if not (path.parent / target).exists():
                missing.append(f"{path.relative_to(ROOT)} -> {target}")
    assert not missing, missing


@pytest.mark.parametrize("block", PYTHON_BLOCKS, ids=lambda b: b.id)
def test_python_block(block: Block, tmp_path, monkeypatch):
    for spec in REQUIRES.findall(block.code):
        for name in re.split(r"[,\s]+", spec.strip()):
            if name:
                pytest.importorskip(name, reason=f"{block.id} needs {name}")
    monkeypatch.chdir(tmp_path)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    torch.manual_seed(0)
    # padded so that tracebacks show the Markdown file's own line numbers
    code = compile("\n" * (block.line - 1) + block.code, str(block.path), "exec")
    namespace = {"__name__": BLOCK_MODULE}
    try:
        with warnings.catch_warnings():
            for category in (DeprecationWarning, FutureWarning):
                warnings.filterwarnings("error", category=category, module=BLOCK_MODULE)
            exec(code, namespace)
    finally:
        torch.set_num_threads(threads)


# -- shell blocks ------------------------------------------------------------------------------


def shell_commands(code: str) -> list[list[str]]:
    """Commands of a shell block: continuation lines joined, comments dropped, split at
    ``&&``, ``||`` and ``;``, leading ``VAR=value`` assignments removed."""
    text = re.sub(r"\\\n", " ", code)
    commands: list[list[str]] = []
    for line in text.splitlines():
        lexer = shlex.shlex(line, posix=True, punctuation_chars=";&|")
        lexer.whitespace_split = True
        lexer.commenters = "#"
        current: list[str] = []
        for token in lexer:
            if token in ("&&", "||", ";", "|", "&"):
                if current:
                    commands.append(current)
                current = []
            else:
                current.append(token)
        if current:
            commands.append(current)
    out = []
    for argv in commands:
        while argv and re.fullmatch(r"[A-Za-z_][A-Za-z0-9_]*=.*", argv[0]):
            argv = argv[1:]
        if argv:
            out.append(argv)
    return out


@functools.cache
def help_text(module_name: str) -> str:
    """What ``main(["--help"])`` of a command module prints."""
    try:
        module = importlib.import_module(module_name)
    except ModuleNotFoundError as err:  # an optional extra the command needs is missing
        if err.name is None or err.name.split(".")[0] == "gblr":
            raise
        pytest.skip(f"{module_name} needs {err.name}, which is not installed")
    buffer = io.StringIO()
    with contextlib.redirect_stdout(buffer), contextlib.redirect_stderr(io.StringIO()):
        try:
            module.main(["--help"])
        except SystemExit as stop:
            assert stop.code in (0, None), f"{module_name} --help exited with {stop.code}"
    text = buffer.getvalue()
    assert text.strip(), f"{module_name} --help printed nothing"
    return text


def check_flags(module_name: str, args: list[str], where: str) -> None:
    text = help_text(module_name)
    for arg in args:
        if arg.startswith("-") and arg not in ("-", "--"):
            flag = arg.split("=", 1)[0]
            if not re.search(rf"(?<![\w-]){re.escape(flag)}(?![\w-])", text):
                pytest.fail(f"{where}: {flag} is not an option of {module_name}")


def check_train(args: list[str], where: str) -> None:
    if args in (["--help"], ["-h"]):
        return
    experiments = ROOT / "src" / "gblr" / "conf" / "experiment"
    names = [a.split("=", 1)[1] for a in args if a.startswith("experiment=")]
    assert names, f"{where}: gblr train needs experiment=NAME"
    for name in names:
        assert (experiments / f"{name}.yaml").is_file(), f"{where}: no experiment {name!r}"
    if importlib.util.find_spec("hydra") is None:
        return
    from gblr.train.runner import compose

    try:
        compose(args)  # unknown keys and bad values raise
    except Exception as err:
        pytest.fail(f"{where}: does not compose: {type(err).__name__}: {err}")


def check_command(argv: list[str], where: str) -> None:
    from gblr.cli import COMMANDS

    program, args = argv[0], argv[1:]
    if program in ("pip", "pip3") or (program.startswith("python") and args[:2] == ["-m", "pip"]):
        return
    if program == "pytest" or (program.startswith("python") and args[:2] == ["-m", "pytest"]):
        return
    if program == "bash":
        assert args and (ROOT / args[0]).is_file(), f"{where}: no script {args[:1]}"
        return
    if program.startswith("python") and len(args) >= 2 and args[0] == "-m":
        module, args = args[1], args[2:]
        if module == "gblr.cli":
            program = "gblr"
        elif module == "gblr.bench":
            check_flags("gblr.bench.suite", args, where)
            return
        elif module.startswith("gblr."):
            assert importlib.util.find_spec(module), f"{where}: no module {module}"
            check_flags(module, args, where)
            return
        else:
            pytest.fail(f"{where}: unexpected module {module}")
    if program != "gblr":
        pytest.fail(f"{where}: unexpected command {' '.join(argv)!r}")
    if not args or args[0] in ("-h", "--help"):
        return
    assert args[0] in COMMANDS, f"{where}: gblr has no command {args[0]!r}"
    if args[0] == "train":
        check_train(args[1:], where)
    else:
        check_flags(COMMANDS[args[0]][0], args[1:], where)


@pytest.mark.parametrize("block", SHELL_BLOCKS, ids=lambda b: b.id)
def test_shell_block(block: Block):
    commands = shell_commands(block.code)
    assert commands, f"{block.id}: empty shell block"
    for argv in commands:
        check_command(argv, f"{block.id}: {' '.join(argv)}")
