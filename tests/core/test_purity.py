"""The core stays pure: a test fails if it imports anything that does I/O or keeps time."""

import ast
import pathlib

import localrref.core

FORBIDDEN = {"threading", "multiprocessing", "queue", "time", "pickle", "logging", "torch",
             "psutil", "os", "socket", "signal", "asyncio", "concurrent", "random", "select"}
CORE = pathlib.Path(localrref.core.__file__).parent


def imported_modules(path: pathlib.Path) -> set[str]:
    tree = ast.parse(path.read_text(), filename=str(path))
    names = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            names.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            if node.level:  # relative: ours
                names.add("." * node.level + (node.module or ""))
            else:
                names.add(node.module or "")
    return names


def test_core_imports_nothing_impure():
    offenders = {}
    for path in sorted(CORE.glob("*.py")):
        bad = {n for n in imported_modules(path) if n.split(".")[0] in FORBIDDEN}
        if bad:
            offenders[path.name] = sorted(bad)
    assert offenders == {}


def test_core_imports_of_ours_are_errors_only():
    for path in sorted(CORE.glob("*.py")):
        for name in imported_modules(path):
            if name.startswith("..") or name.startswith("localrref"):
                assert name in ("..errors", "localrref.errors"), (path.name, name)


def test_purity_check_catches_an_impure_import(tmp_path):
    sample = tmp_path / "sample.py"
    sample.write_text("import threading\nfrom time import monotonic\nfrom . import ids\n")
    assert imported_modules(sample) == {"threading", "time", "."}
