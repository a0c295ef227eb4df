"""The command line is the top of the library: no package below it imports it (the
cluster's objects and Katib take the command line they run from their caller)."""

import ast
import pathlib

import embedpipe

PACKAGE = pathlib.Path(embedpipe.__file__).parent


def _imported(path: pathlib.Path) -> set[str]:
    names = set()
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.Import):
            names |= {alias.name for alias in node.names}
        elif isinstance(node, ast.ImportFrom) and node.module:
            names.add(node.module)
            names |= {f"{node.module}.{alias.name}" for alias in node.names}
    return names


def test_no_package_below_the_command_line_imports_it():
    below = [
        path
        for path in PACKAGE.rglob("*.py")
        if path.relative_to(PACKAGE).parts[0] not in ("cli", "__main__.py")
    ]
    assert len(below) > 50
    upward = {
        str(path.relative_to(PACKAGE)): sorted(
            name for name in _imported(path) if name.startswith("embedpipe.cli")
        )
        for path in below
    }
    assert {path: names for path, names in upward.items() if names} == {}
