"""Which model event a node is bound to: the moment in the forward (or backward) it must run at.

    >>> event_of(graph.nodes, node)
    ('model.layers.3.mlp', 'output', 0)        # (module path, kind, step)

Reads and writes of a module's input/output, skips and gradients are bound to their
module's event. So is an in-place write (``x[...] = v``, ``x.add_(...)``) into a value read
from a module, also through views (``out[:, -1][0] = v``): it must run while the model still
holds that tensor, not whenever its right-hand side happens to become available.
"""
from __future__ import annotations

from typing import Any

from .nodes import GRAD_OPS, Node
from .values import Ref

EventKey = tuple[str, str, Any]   # (module path, kind: input|output|skip|grad|result, step)

#: tensor methods whose result may share storage with the tensor they are called on: views, and casts that
#: return the tensor itself when nothing changes (``w.float()`` is ``w`` for a float32 ``w``). One list for
#: the executor's event binding (a write into a view of a module's output) and the validator's weight rules.
VIEW_METHODS = frozenset({
    "view", "view_as", "reshape", "reshape_as", "transpose", "permute", "narrow", "select", "squeeze",
    "unsqueeze", "expand", "expand_as", "t", "flatten", "unflatten", "movedim", "diagonal", "as_strided",
    "swapaxes", "swapdims", "detach", "unfold", "split", "chunk", "unbind",
    "contiguous", "to", "type_as", "float", "double", "half", "bfloat16", "int", "long", "bool",
})
_KIND_OF = {"output": "output", "set_output": "output", "input": "input", "inputs": "input",
            "set_input": "input", "skip": "skip"}


def is_mutation(node: Node) -> bool:
    """In-place writes: ``x[i] = v`` and trailing-underscore tensor methods."""
    return node.op == "setitem" or (node.op == "call_method" and (node.target or "").endswith("_"))


def event_of(nodes: list[Node], node: Node) -> EventKey | None:
    """The event ``node`` must run at, or None if it can run whenever its inputs exist."""
    if node.op in _KIND_OF:
        return (node.target or "", _KIND_OF[node.op], node.step)
    if node.op in GRAD_OPS:
        read = _arg_node(nodes, node)
        if read is None or read.op != "output":
            return None
        return (read.target or "", "grad", read.step)
    if node.op == "result":
        return ("", "result", "all")
    if is_mutation(node):
        origin = _view_origin(nodes, node)
        if origin is not None:
            return event_of(nodes, origin)
    return None


def _arg_node(nodes: list[Node], node: Node) -> Node | None:
    if node.args and isinstance(node.args[0], Ref) and 0 <= node.args[0].id < node.id:
        return nodes[node.args[0].id]
    return None


def _view_origin(nodes: list[Node], node: Node) -> Node | None:
    """The module read that the mutated tensor is (a view of), if any."""
    current = _arg_node(nodes, node)
    while current is not None:
        if current.op in ("output", "input", "inputs", "grad"):
            return current
        is_view = current.op in ("getitem", "getattr") or (
            current.op == "call_method" and current.target in VIEW_METHODS)
        if not is_view:
            return None
        current = _arg_node(nodes, current)
    return None
