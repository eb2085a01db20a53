"""The import graph runs one way: no cycle between modules, no upward import between layers, and no
underscore name imported across packages. Every import counts: module level, inside functions, and
under ``TYPE_CHECKING`` (a cycle there is still a cycle in the design).

Layers, bottom to top (docs/ARCHITECTURE.md draws them):
    0  sandbox_client.graph, sandbox_client.errors, sandbox_client.lazy   the format; import nothing of ours
    1  validator (the rules), storage (beside it)                         each imports only layer 0
    2  sandbox_client.interpreter                                         executing a graph; dry runs
    3  sandbox_client (the tracing front end, remote included)
    4  sandbox_server                                                     nothing imports it
"""
from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
PACKAGES = ("sandbox_client", "validator", "storage", "sandbox_server")
#: unit (a module prefix) -> layer; a module belongs to the longest prefix that matches it
UNITS = {
    "sandbox_client.graph": 0, "sandbox_client.errors": 0, "sandbox_client.lazy": 0,
    "validator": 1, "storage": 1,
    "sandbox_client.interpreter": 2,
    "sandbox_client": 3,
    "sandbox_server": 4,
}


def module_files() -> dict[str, Path]:
    found: dict[str, Path] = {}
    for package in PACKAGES:
        for path in (ROOT / package).rglob("*.py"):
            parts = list(path.relative_to(ROOT).with_suffix("").parts)
            if parts[-1] == "__init__":
                parts.pop()
            found[".".join(parts)] = path
    return found


MODULES = module_files()


def unit_of(module: str) -> str:
    matches = [u for u in UNITS if module == u or module.startswith(u + ".")]
    return max(matches, key=len)


def imports_of(module: str, path: Path) -> list[tuple[str, list[str], int]]:
    """(imported module, names taken from it, line) for every import statement in ``path``."""
    is_package = path.name == "__init__.py"
    base = module.split(".") if is_package else module.split(".")[:-1]
    found: list[tuple[str, list[str], int]] = []
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            found.extend((alias.name, [], node.lineno) for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                anchor = base[: len(base) - (node.level - 1)]
                target = ".".join(anchor + ([node.module] if node.module else []))
            else:
                target = node.module or ""
            names = [alias.name for alias in node.names]
            submodules = [n for n in names if f"{target}.{n}" in MODULES]
            found.extend((f"{target}.{n}", [], node.lineno) for n in submodules)
            found.append((target, [n for n in names if n not in submodules], node.lineno))
    return [(m, names, line) for m, names, line in found if m.split(".")[0] in PACKAGES]


EDGES = {module: imports_of(module, path) for module, path in MODULES.items()}


def test_every_import_of_ours_names_a_real_module() -> None:
    missing = [f"{m} -> {t} (line {line})" for m, edges in EDGES.items() for t, _, line in edges if t not in MODULES]
    assert not missing, missing


def test_no_upward_or_sideways_import_between_layers() -> None:
    bad = []
    for module, edges in EDGES.items():
        here = unit_of(module)
        for target, _, line in edges:
            there = unit_of(target)
            if there != here and UNITS[there] >= UNITS[here]:
                bad.append(f"{MODULES[module].relative_to(ROOT)}:{line}: {here} (layer {UNITS[here]}) imports "
                           f"{target} ({there}, layer {UNITS[there]})")
    assert not bad, "\n".join(bad)


def test_no_import_cycle_between_modules() -> None:
    graph = {m: {t for t, _, _ in edges if t in MODULES and t != m} for m, edges in EDGES.items()}
    cycles = [c for c in strongly_connected(graph) if len(c) > 1]
    assert not cycles, cycles


def test_no_underscore_name_imported_across_packages() -> None:
    bad = [f"{MODULES[m].relative_to(ROOT)}:{line}: {n} from {t}"
           for m, edges in EDGES.items() for t, names, line in edges
           for n in names if n.startswith("_") and unit_of(t) != unit_of(m)]
    assert not bad, bad


@pytest.mark.parametrize("module", ["sandbox_client.graph", "sandbox_client.errors", "sandbox_client.lazy"])
def test_the_bottom_imports_nothing_of_ours_outside_itself(module: str) -> None:
    inside = [m for m in MODULES if unit_of(m) == module]
    outside = [f"{m} -> {t}" for m in inside for t, _, _ in EDGES[m] if unit_of(t) != module]
    assert inside and not outside, outside


def test_the_checker_sees_a_cycle_and_an_upward_import() -> None:
    # the independent reference: a hand-made graph with a known cycle
    assert [sorted(c) for c in strongly_connected({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}})
            if len(c) > 1] == [["a", "b", "c"]]
    assert unit_of("sandbox_client.interpreter.runner") == "sandbox_client.interpreter"
    assert UNITS[unit_of("validator.check")] < UNITS[unit_of("sandbox_client.interpreter.ops")]


def strongly_connected(graph: dict[str, set[str]]) -> list[list[str]]:
    """Tarjan's algorithm, iteratively."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    on_stack: set[str] = set()
    stack: list[str] = []
    components: list[list[str]] = []
    counter = 0
    for root in graph:
        if root in index:
            continue
        work = [(root, iter(sorted(graph.get(root, ()))))]
        index[root] = low[root] = counter
        counter += 1
        stack.append(root)
        on_stack.add(root)
        while work:
            node, children = work[-1]
            child = next(children, None)
            if child is not None:
                if child not in index:
                    index[child] = low[child] = counter
                    counter += 1
                    stack.append(child)
                    on_stack.add(child)
                    work.append((child, iter(sorted(graph.get(child, ())))))
                elif child in on_stack:
                    low[node] = min(low[node], index[child])
                continue
            work.pop()
            if work:
                low[work[-1][0]] = min(low[work[-1][0]], low[node])
            if low[node] == index[node]:
                component = []
                while True:
                    item = stack.pop()
                    on_stack.discard(item)
                    component.append(item)
                    if item == node:
                        break
                components.append(component)
    return components
