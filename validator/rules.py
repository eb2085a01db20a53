"""Per-node rules: what each op may name and which arguments it may take.

    check_node(node, context)      # raises ValidationError with the node's id and source line
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import torch

from sandbox_client.events import is_mutation
from sandbox_client.graph import Graph, Node, Ref

from .allowlist import ATTRIBUTES, CAST_METHODS, FACTORIES, FUNCTIONS, SIZED_METHODS, TENSOR_METHODS
from .restricted import UserFunctionError, check_source
from .spec import ModelSpec
from .types import Limits, ValidationError
from .values import literal_int

_PATH_OPS = frozenset({"output", "input", "inputs", "set_output", "set_input", "skip", "call_module"})
_DANGER_HINT = ("files, processes, imports, serialization and raw memory are never reachable from a graph; "
                "see docs/security.md for what is allowed")


@dataclass
class RuleContext:
    graph: Graph
    spec: ModelSpec
    limits: Limits
    weight_views: set[int]        # node ids whose value is (a view of) a model weight


def fail(code: str, message: str, node: Node) -> ValidationError:
    return ValidationError(code, message, node=node.id, source=node.source)


def check_node(node: Node, ctx: RuleContext) -> None:
    """Every rule that applies to one node."""
    _check_refs(node, ctx)
    if node.step != 0 or node.invoke is not None:
        _check_binding(node, ctx)
    checker = _BY_OP.get(node.op)
    if checker is not None:
        checker(node, ctx)
    if ctx.weight_views or node.op == "param":
        if is_mutation(node) and node.args and isinstance(node.args[0], Ref) and node.args[0].id in ctx.weight_views:
            raise fail("write_to_weight", "this writes into a model weight or buffer; weights are shared by every "
                       "user and read-only: .clone() it first", node)
        if _is_weight_view(node, ctx):
            ctx.weight_views.add(node.id)


def _check_refs(node: Node, ctx: RuleContext) -> None:
    refs = node.refs()
    if refs and (min(refs) < 0 or max(refs) >= node.id):
        ref = next(r for r in refs if not 0 <= r < node.id)
        raise fail("bad_reference", f"node {node.id} refers to node {ref}; a node may only use earlier nodes",
                       node)
    if len(node.source) > ctx.limits.max_source_length:
        raise fail("string_length", "the node's source text is too long", node)


def _check_binding(node: Node, ctx: RuleContext) -> None:
    if node.invoke is not None and not 0 <= node.invoke < len(ctx.graph.invokes):
        raise fail("bad_invoke", f"node names invoke {node.invoke}, but the graph has {len(ctx.graph.invokes)}",
                   node)
    if node.step == "all" or node.step == 0:
        return
    if ctx.graph.kind == "trace":
        raise fail("step_range", "a trace has one forward (step 0); steps exist only in generate", node)
    max_new = ctx.graph.options.get("max_new_tokens", 20)
    if not isinstance(node.step, int) or not 0 <= node.step < max_new:
        raise fail("step_range", f"step {node.step!r} is outside 0..{max_new - 1} (max_new_tokens={max_new})", node)


def _check_path(node: Node, ctx: RuleContext) -> None:
    path = node.target or ""
    if path not in ctx.spec.modules:
        raise fail("module_path", f"no module {path!r} in model {ctx.spec.name!r}", node)


def _check_function(node: Node, ctx: RuleContext) -> None:
    name = node.target or ""
    if name not in FUNCTIONS:
        raise fail("target_not_allowed", f"function {name!r} is not on the allowlist; {_DANGER_HINT}", node)
    if name in FACTORIES:
        _check_factory(node, ctx)


def _check_method(node: Node, ctx: RuleContext) -> None:
    name = node.target or ""
    if "__" in name or name not in TENSOR_METHODS:
        raise fail("target_not_allowed", f"tensor method {name!r} is not on the allowlist; {_DANGER_HINT}", node)
    if name in CAST_METHODS:
        _check_cast(node)
    if name in SIZED_METHODS:
        _check_sizes(node, node.args[1:], ctx)
    if name == "backward" and set(node.kwargs) - {"retain_graph"}:
        raise fail("argument_not_allowed", "backward() accepts only retain_graph=", node)


def _check_getattr(node: Node, ctx: RuleContext) -> None:
    name = node.target or ""
    if "__" in name or name.startswith("_"):
        raise fail("dunder", f"attribute {name!r}: private and dunder attributes are never reachable", node)
    if name not in ATTRIBUTES:
        raise fail("attribute_not_allowed", f"attribute {name!r} is not on the allowlist (allowed: "
                   f"{', '.join(sorted(ATTRIBUTES))})", node)


def _check_apply(node: Node, ctx: RuleContext) -> None:
    try:
        check_source(node.target or "")
    except UserFunctionError as err:
        raise fail("user_function", str(err), node) from None


def _check_param(node: Node, ctx: RuleContext) -> None:
    if not ctx.spec.has_param(node.target or ""):
        raise fail("param_path", f"no parameter or buffer {node.target!r} in model {ctx.spec.name!r}", node)


def _check_cast(node: Node) -> None:
    for value in (*node.args[1:], *node.kwargs.values()):
        if isinstance(value, (str, torch.device)) or (isinstance(value, Ref) and node.target == "to"):
            raise fail("device_move", ".to() may change the dtype only (e.g. .to(torch.float32)); devices and "
                       "tensors as targets are refused: the server decides where tensors live", node)
    if set(node.kwargs) - {"dtype", "copy"}:
        raise fail("device_move", ".to() accepts only dtype= and copy=", node)


def _check_factory(node: Node, ctx: RuleContext) -> None:
    name = node.target or ""
    if set(node.kwargs) & {"device", "out", "pin_memory", "layout"}:
        raise fail("device_move", f"{name} may not choose a device, layout or output buffer", node)
    if name == "torch.tensor":
        return  # data is a literal whose size the value walk already bounds
    if name in ("torch.arange", "torch.linspace"):
        _check_range(node, ctx)
        return
    if name == "torch.randint":
        _check_sizes(node, node.args[-1:] if node.args else (), ctx)
        return
    sizes = node.args[:1] if name in ("torch.full", "torch.eye") else node.args
    if "size" in node.kwargs:
        sizes = (node.kwargs["size"],)
    _check_sizes(node, sizes, ctx)


def _check_sizes(node: Node, sizes: tuple[Any, ...], ctx: RuleContext) -> None:
    dims: list[Any] = []
    for value in sizes:
        dims.extend(value if isinstance(value, (list, tuple, torch.Size)) else [value])
    total = 1
    for dim in dims:
        size = literal_int(dim)
        if size is None:
            raise fail("factory_size", f"{node.target}: sizes must be literal integers so the server can bound "
                       "the memory before running (use *_like(x) to follow a traced value's shape)", node)
        if size < -1:
            raise fail("factory_size", f"{node.target}: negative size {size}", node)
        total *= max(size, 1)
        if total > ctx.limits.max_factory_elements:
            raise fail("factory_size", f"{node.target} would create more than {ctx.limits.max_factory_elements} "
                       "elements", node)


def _check_range(node: Node, ctx: RuleContext) -> None:
    numbers = [v for v in node.args if not isinstance(v, torch.dtype)][:3]
    if not numbers or not all(isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)
                              for v in numbers):
        raise fail("factory_size", f"{node.target}: bounds must be finite literal numbers", node)
    if node.target == "torch.linspace":
        count = numbers[2] if len(numbers) > 2 else node.kwargs.get("steps", 0)
    else:
        start, end, step = (0, numbers[0], 1) if len(numbers) == 1 else (*numbers[:2], numbers[2] if len(numbers) > 2
                                                                         else 1)
        count = abs((end - start) / step) if step else math.inf
    if not isinstance(count, (int, float)) or count > ctx.limits.max_factory_elements:
        raise fail("factory_size", f"{node.target} would create more than {ctx.limits.max_factory_elements} "
                   "elements", node)


def _is_weight_view(node: Node, ctx: RuleContext) -> bool:
    if node.op == "param":
        return True
    if not node.args or not isinstance(node.args[0], Ref) or node.args[0].id not in ctx.weight_views:
        return False
    return node.op in ("getitem", "getattr") or (node.op == "call_method" and node.target in _WEIGHT_VIEWS)


_WEIGHT_VIEWS = frozenset({"view", "view_as", "reshape", "transpose", "permute", "t", "detach", "narrow",
                           "select", "squeeze", "unsqueeze", "expand", "flatten", "unflatten", "movedim",
                           "swapaxes", "diagonal", "contiguous", "split", "chunk", "unbind", "reshape_as"})

_BY_OP = {
    "call_function": _check_function,
    "call_method": _check_method,
    "getattr": _check_getattr,
    "param": _check_param,
    "apply": _check_apply,
    **{op: _check_path for op in _PATH_OPS},
}
