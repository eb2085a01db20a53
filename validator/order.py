"""Static checks before running: module paths exist, skips do not nest, and time order is feasible.

    check_graph(graph, model)      # raises ModulePathError / TraceError / OrderError

Time order: every node bound to a model event (a write, a skip, a read after a write) must
only need values from events that can happen no later than its own. Event order is known
where the model's structure fixes it: an ancestor's input comes before its descendants'
events and its output after them; siblings in a ModuleList run in index order; steps run
in order; gradients come after the forward. Elsewhere the executor checks at run time.
"""
from __future__ import annotations

from collections.abc import Collection
from typing import Any

from torch import nn

from sandbox_client.errors import ModulePathError, OrderError, TraceError
from sandbox_client.graph import Graph, Node
from sandbox_client.graph.events import event_of, is_mutation

Event = tuple[str, str, Any]   # (path, phase: 'in'|'out'|'grad'|'end', step)
_PHASE = {"input": "in", "skip": "in", "output": "out", "grad": "grad"}
_WRITE_OPS = frozenset({"set_output", "set_input", "skip", "set_grad"})
_PATH_OPS = frozenset({"output", "input", "inputs", "set_output", "set_input", "skip", "call_module"})


def check_graph(graph: Graph, module_names: Collection[str]) -> None:
    """All static checks the local interpreter needs (the validator adds many more)."""
    check_paths(graph, module_names)
    check_order(graph)


def module_names(root: nn.Module) -> frozenset[str]:
    """Every module path of ``root`` ('' is the root)."""
    return frozenset(name for name, _ in root.named_modules())


def check_paths(graph: Graph, names: Collection[str]) -> None:
    for node in graph.nodes:
        if node.op in _PATH_OPS:
            if (node.target or "") not in names:
                raise ModulePathError(f"no module {node.target!r} in this model", source=node.source)
    check_skips(graph)


def check_skips(graph: Graph) -> None:
    """A module inside a skipped module never runs, so skipping both is an error."""
    skipped = [(node.target or "", node.step, node) for node in graph.nodes if node.op == "skip"]
    for path, step, node in skipped:
        for other, other_step, _ in skipped:
            if other != path and path.startswith(other + ".") and step == other_step:
                raise TraceError(f"cannot skip {path!r}: its parent {other!r} is skipped too, so it never runs",
                                 source=node.source)


def check_order(graph: Graph) -> None:
    """Refuse graphs whose writes need values produced later in the same forward."""
    if not any(node.op in _WRITE_OPS or is_mutation(node) for node in graph.nodes):
        return   # a graph that only reads cannot be out of order
    latest: list[list[Event]] = []
    for node in graph.nodes:
        deps: list[Event] = []
        for d in node.refs():
            deps.extend(latest[d])
        own = _own_event(node, graph)
        if own is not None and node.op not in ("output", "input", "inputs"):
            for dep in deps:
                if _later(dep, own):
                    culprit = _source_of(graph, node, dep)
                    raise OrderError(
                        f"this line needs a value from {_describe(dep)}{culprit}, which the model computes after "
                        f"{_describe(own)}; a value cannot be used before the forward produces it: "
                        "split the work into two traces, or take the value from an earlier invoke",
                        source=node.source)
        mine = deps + ([own] if own is not None else [])
        latest.append(_maximal(mine))


def _own_event(node: Node, graph: Graph) -> Event | None:
    event = event_of(graph.nodes, node)
    if event is None or event[1] == "result":
        return None
    path, kind, step = event
    return (path, _PHASE[kind], step)


def _later(a: Event, b: Event) -> bool:
    """True when event ``a`` certainly happens after event ``b``."""
    (pa, fa, sa), (pb, fb, sb) = a, b
    if "all" in (sa, sb):
        return False
    if sa != sb:
        return bool(sa > sb)
    if fa == "grad" or fb == "grad":
        return fa == "grad" and fb != "grad"
    if pa == pb:
        return fa == "out" and fb == "in"
    if _is_ancestor(pa, pb):
        return fa == "out"
    if _is_ancestor(pb, pa):
        return fb == "in"
    ia, ib = _sibling_indices(pa, pb)
    return ia is not None and ib is not None and ia > ib


def _is_ancestor(parent: str, child: str) -> bool:
    return parent == "" or child.startswith(parent + ".")


def _sibling_indices(a: str, b: str) -> tuple[int | None, int | None]:
    pa, pb = a.split("."), b.split(".")
    for x, y in zip(pa, pb, strict=False):
        if x != y:
            return (int(x), int(y)) if x.isdigit() and y.isdigit() else (None, None)
    return None, None


def _maximal(events: list[Event]) -> list[Event]:
    unique = list(dict.fromkeys(events))
    if len(unique) < 2:
        return unique
    return [e for e in unique if not any(_later(o, e) for o in unique if o != e)]


def _describe(event: Event) -> str:
    path, phase, step = event
    what = {"in": "the input of", "out": "the output of", "grad": "the gradient of"}[phase]
    where = f"module {path!r}" if path else "the model"
    return f"{what} {where}" + (f" at step {step}" if step not in (0, "all") else "")


def _source_of(graph: Graph, node: Node, event: Event) -> str:
    for other in graph.nodes[: node.id]:
        if _own_event(other, graph) == event and other.source:
            return f" (read at {other.source})"
    return ""
