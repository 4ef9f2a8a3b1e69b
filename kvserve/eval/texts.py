"""Long English text that every machine with Python has: the Python license and the docstrings
of standard-library modules (read from their source, nothing imported), in a fixed order."""
import ast
import sysconfig
from pathlib import Path

MODULES = ["argparse", "collections/__init__", "difflib", "textwrap", "inspect", "dataclasses", "pathlib",
           "logging/__init__", "unittest/case", "http/client", "email/message", "typing", "json/__init__",
           "functools", "threading", "subprocess", "tarfile", "zipfile/__init__", "shutil", "tempfile"]


def long_text(min_chars: int) -> str:
    stdlib = Path(sysconfig.get_paths()["stdlib"])
    parts = []
    license_file = stdlib / "LICENSE.txt"
    if license_file.exists():
        parts.append(license_file.read_text(errors="replace"))
    for name in MODULES:
        path = stdlib / f"{name}.py"
        if not path.exists():
            continue
        tree = ast.parse(path.read_text(errors="replace"))
        for node in ast.walk(tree):
            if isinstance(node, (ast.Module, ast.ClassDef, ast.FunctionDef)):
                doc = ast.get_docstring(node)
                if doc and len(doc) > 200:
                    parts.append(doc)
        if sum(map(len, parts)) >= min_chars:
            break
    text = "\n\n".join(parts)
    while len(text) < min_chars:  # a very short stdlib: repeat rather than fail
        text += "\n\n" + text
    return text
