"""kvserve.cli is the top of the import graph: it imports every subcommand, so a module that
imported it back would close a circle."""
import ast
from pathlib import Path

PACKAGE = Path(__file__).parent.parent / "kvserve"


def imported_modules(tree: ast.AST):
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            yield from (alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            yield node.module
            yield from (f"{node.module}.{alias.name}" for alias in node.names)


def test_no_module_imports_the_cli():
    offenders = []
    for path in sorted(PACKAGE.rglob("*.py")):
        if path.relative_to(PACKAGE).as_posix() in ("cli.py", "__main__.py"):
            continue
        if "kvserve.cli" in set(imported_modules(ast.parse(path.read_text(), str(path)))):
            offenders.append(path.relative_to(PACKAGE.parent).as_posix())
    assert not offenders, f"these import kvserve.cli (move what they need below it): {offenders}"
