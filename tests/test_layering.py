"""The layers of localrref, read from the imports themselves (ast), and no import cycles.

Every ``import`` of ours, at module level or inside a function, must go
downwards in this map (the README's "Where to make a change" shows it)::

    api.py ──► rref.py ──► agent/ ──► core/ (pure)      testing/ ──► core/
      │                      ├──► codec/ ──► core/
      │                      └──► transport/             launch/ ──► transport/
      └──► launch/ (join a world through a rendezvous)

    leaves, importable by every layer but core/: errors, constants, options,
    world, control_messages, dtypes, functions (core/ may import errors only)
"""

from __future__ import annotations

import ast
import pathlib

import pytest

import localrref

ROOT = pathlib.Path(localrref.__file__).parent

LEAVES = {"localrref.errors", "localrref.constants", "localrref.options", "localrref.world",
          "localrref.control_messages", "localrref.dtypes", "localrref.functions",
          "localrref.handover"}
# Each layer and what, of ours, it may import (besides itself).
ALLOWED = {
    "localrref.core": {"localrref.errors"},
    "localrref.testing": {"localrref.core", "localrref.errors"},
    "localrref.codec": {"localrref.core", *LEAVES},
    "localrref.transport": LEAVES,
    "localrref.launch": {"localrref.transport", *LEAVES},
    "localrref.agent": {"localrref.core", "localrref.codec", "localrref.transport", *LEAVES},
    "localrref.rref": {"localrref.agent", *LEAVES},
    "localrref.autograd": {"localrref.agent", "localrref.core", *LEAVES},
    "localrref.api": {"localrref.agent", "localrref.rref", "localrref.launch", *LEAVES},
    # Built on the public API, as torch's are on torch's.
    "localrref.optim": {"localrref.api", "localrref.autograd", "localrref.rref",
                        "localrref.agent", *LEAVES},
    # nn registers RemoteModule's RPC-only reducer with the codec, as torch's
    # remote_module does with its _internal_rpc_pickler.
    "localrref.nn": {"localrref.api", "localrref.rref", "localrref.agent", "localrref.codec",
                     *LEAVES},
    # The runner: the public API under torch's names, and the launcher.
    "localrref.run": {"localrref", "localrref.api", "localrref.rref", "localrref.launch",
                      "localrref.optim", "localrref.nn", *LEAVES},
    # Programs written against the public API, as users write them.
    "localrref.examples": {"localrref"},
    "localrref.options": {"localrref.constants"},
    **{leaf: set() for leaf in LEAVES - {"localrref.options"}},
}


def modules() -> dict[str, pathlib.Path]:
    found = {}
    for path in ROOT.rglob("*.py"):
        parts = list(path.relative_to(ROOT.parent).with_suffix("").parts)
        if parts[-1] == "__init__":
            parts.pop()
        found[".".join(parts)] = path
    return found


MODULES = modules()


def imports_of(name: str, path: pathlib.Path) -> set[str]:
    """Every module of ours ``name`` imports, anywhere in the file."""
    package = name if path.name == "__init__.py" else name.rsplit(".", 1)[0]
    found = set()
    for node in ast.walk(ast.parse(path.read_text(), filename=str(path))):
        if isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")[:len(package.split(".")) - node.level + 1]
                module = ".".join(base + ([node.module] if node.module else []))
            else:
                module = node.module or ""
            for alias in node.names:
                sub = f"{module}.{alias.name}"
                found.add(sub if sub in MODULES else module)
    return {_known(m) for m in found if m == "localrref" or m.startswith("localrref.")}


def _known(module: str) -> str:
    while module not in MODULES and "." in module:
        module = module.rsplit(".", 1)[0]
    return module


def layer_of(module: str) -> str | None:
    for layer in sorted(ALLOWED, key=len, reverse=True):
        if module == layer or module.startswith(layer + "."):
            return layer
    return None


def violations(graph: dict[str, set[str]]) -> list[str]:
    found = []
    for module, deps in sorted(graph.items()):
        layer = layer_of(module)
        if layer is None:
            continue
        for dep in sorted(deps):
            if dep == module or layer_of(dep) == layer:
                continue
            if not any(dep == ok or dep.startswith(ok + ".") for ok in ALLOWED[layer]):
                found.append(f"{module} imports {dep}")
    return found


def cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """The strongly connected components of more than one module (Tarjan)."""
    index, low, stack, on_stack, found = {}, {}, [], set(), []

    def visit(v):
        index[v] = low[v] = len(index)
        stack.append(v)
        on_stack.add(v)
        for w in graph.get(v, ()):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on_stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            component = []
            while True:
                w = stack.pop()
                on_stack.discard(w)
                component.append(w)
                if w == v:
                    break
            if len(component) > 1:
                found.append(sorted(component))

    for v in sorted(graph):
        if v not in index:
            visit(v)
    return found


def graph_of_package() -> dict[str, set[str]]:
    return {name: imports_of(name, path) - {name} for name, path in MODULES.items()}


def test_every_module_has_a_layer():
    # The package's __init__ files only re-export; the rest must be placed.
    unplaced = [m for m in MODULES if layer_of(m) is None and not m.endswith(("__init__",))
                and m not in ("localrref", "localrref.agent", "localrref.codec",
                              "localrref.transport", "localrref.launch", "localrref.core",
                              "localrref.testing", "localrref.examples")]
    assert unplaced == []


def test_imports_go_down_the_layers():
    assert violations(graph_of_package()) == []


def test_no_import_cycles():
    assert cycles(graph_of_package()) == []


@pytest.mark.parametrize("module, planted", [
    ("localrref.core.rref_context", "localrref.agent.agent"),
    ("localrref.codec.pickler", "localrref.transport.shm"),
    ("localrref.transport.mpqueue", "localrref.codec.frames"),
    ("localrref.launch.supervisor", "localrref.agent.agent"),
    ("localrref.agent.calls", "localrref.api"),
])
def test_a_planted_forbidden_import_is_caught(module, planted):
    graph = graph_of_package()
    graph[module] = graph[module] | {planted}
    assert f"{module} imports {planted}" in violations(graph)


def test_a_planted_cycle_is_caught():
    graph = graph_of_package()
    graph["localrref.core.ids"] = graph["localrref.core.ids"] | {"localrref.core.rref_context"}
    assert any("localrref.core.ids" in c and "localrref.core.rref_context" in c
               for c in cycles(graph))
