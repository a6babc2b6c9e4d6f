"""The package's layering: core rules -> ops -> layers -> projection / models / deploy /
accounting / data -> train -> convert -> bench / cli. No module imports a package above
its own, not even inside a function."""

import ast
from pathlib import Path

import gblr

SRC = Path(gblr.__file__).parent
LEVEL = {
    "core": 0, "cost": 0, "ops": 1, "layers": 2, "accounting": 3, "projection": 3,
    "models": 3, "deploy": 3, "data": 3, "train": 4, "convert": 5, "bench": 6, "cli": 6,
    "conf": 6,
}
#: the top level may use the public facade ``gblr`` (whose ``__init__`` imports neither)
FACADE_LEVEL = 6
#: packages of one level that may import each other (none)
SIDEWAYS: set[tuple[str, str]] = set()


def _imports(path: Path):
    tree = ast.parse(path.read_text(), str(path))
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            yield node.lineno, node.module, [a.name for a in node.names]
        elif isinstance(node, ast.Import):
            for alias in node.names:
                yield node.lineno, alias.name, []
        elif (isinstance(node, ast.Call) and getattr(node.func, "attr", "") == "import_module"
              and node.args and isinstance(node.args[0], ast.Constant)):
            yield node.lineno, str(node.args[0].value), []


def _target(module: str, names: list[str]) -> list[str]:
    parts = module.split(".")
    if parts[0] != "gblr":
        return []
    if len(parts) > 1:
        return [parts[1]]
    # `from gblr import data` names a subpackage; other names come from the facade
    return [n if n in LEVEL else "<gblr>" for n in names] or ["<gblr>"]


def test_no_module_imports_a_higher_package():
    bad = []
    for path in sorted(SRC.rglob("*.py")):
        own = path.relative_to(SRC).parts[0].removesuffix(".py")
        if own == "__init__" or own == "__main__":
            continue
        for line, module, names in _imports(path):
            for tgt in _target(module, names):
                if tgt == own:
                    continue
                if tgt == "<gblr>":
                    if LEVEL[own] < FACADE_LEVEL:
                        bad.append(f"{path.relative_to(SRC)}:{line} imports the gblr facade")
                elif LEVEL.get(tgt, 99) > LEVEL[own] or (
                    LEVEL.get(tgt) == LEVEL[own] and (own, tgt) not in SIDEWAYS
                    and own != "cost"
                ):
                    bad.append(f"{path.relative_to(SRC)}:{line} imports {module}")
    assert not bad, "imports against the layering:\n" + "\n".join(bad)


def test_every_package_is_placed():
    for sub in SRC.iterdir():
        if sub.is_dir() and (sub / "__init__.py").exists():
            assert sub.name in LEVEL, f"gblr.{sub.name} has no place in the layering"
