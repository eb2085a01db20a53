"""Per-node rules: what each op may name and which arguments it may take.

    check_node(node, context)      # raises ValidationError with the node's id and source line
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import torch

from sandbox_client.graph import Graph, Node, Ref
from sandbox_client.graph.events import VIEW_METHODS, is_mutation

from .allowlist import (
    ATTRIBUTES,
    CAST_METHODS,
    FACTORIES,
    FUNCTIONS,
    SIZED_FUNCTIONS,
    SIZED_METHODS,
    TENSOR_METHODS,
    WRITING_ARGUMENTS,
)
from .restricted import UserFunctionError, check_source
from .spec import ModelSpec
from .types import Limits, ValidationError
from .values import literal_int

_WRITE_VALUE_OPS = frozenset({"set_output", "set_input", "skip"})
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
        raise fail("module_path", f"no module {_short(path)!r} in model {ctx.spec.name!r}", node)
    if node.op == "call_module" and path == "":
        raise fail("argument_not_allowed", "the whole model cannot be called ad hoc inside a graph (its inputs "
                   "would escape the batch limits); add an invoke instead", node)
    if node.op in _WRITE_VALUE_OPS:
        value = node.args[0] if node.args else None
        if isinstance(value, Ref) and value.id in ctx.weight_views:
            raise fail("write_to_weight", "a model weight cannot become a module's input or output: the model's own "
                       "in-place operations could then write into it; pass weight.clone() instead", node)


def _short(name: str, limit: int = 80) -> str:
    return name if len(name) <= limit else name[:limit] + "..."


def _check_function(node: Node, ctx: RuleContext) -> None:
    name = node.target or ""
    if name not in FUNCTIONS:
        raise fail("target_not_allowed", f"function {_short(name)!r} is not on the allowlist; {_DANGER_HINT}", node)
    if node.kwargs:
        _check_keywords(node)
    if name in WRITING_ARGUMENTS:
        _check_writing_argument(node, *WRITING_ARGUMENTS[name])
    if name in FACTORIES:
        _check_factory(node, ctx)
    elif name in SIZED_FUNCTIONS:
        _check_sized_function(node, ctx)


def _check_method(node: Node, ctx: RuleContext) -> None:
    name = node.target or ""
    if "__" in name or name not in TENSOR_METHODS:
        raise fail("target_not_allowed", f"tensor method {_short(name)!r} is not on the allowlist; {_DANGER_HINT}",
                   node)
    if name in CAST_METHODS:
        _check_cast(node)
    elif node.kwargs:
        _check_keywords(node)
    if name in SIZED_METHODS:
        keyword = node.kwargs.get("size", node.kwargs.get("repeats"))
        _check_sizes(node, (*node.args[1:], *(() if keyword is None else (keyword,))), ctx)
    if name == "backward" and (set(node.kwargs) - {"retain_graph"} or len(node.args) > 2):
        raise fail("argument_not_allowed", "backward() accepts only a gradient and retain_graph=", node)


def _check_getattr(node: Node, ctx: RuleContext) -> None:
    name = node.target or ""
    if "__" in name or name.startswith("_"):
        raise fail("dunder", f"attribute {_short(name)!r}: private and dunder attributes are never reachable", node)
    if name in ATTRIBUTES:
        return
    if name in TENSOR_METHODS and not _is_used(node, ctx.graph):
        return   # the method lookup a recorded call leaves behind (x.type_as(...)); nothing uses its value
    raise fail("attribute_not_allowed", f"attribute {_short(name)!r} is not on the allowlist (allowed: "
               f"{', '.join(sorted(ATTRIBUTES))})", node)


def _is_used(node: Node, graph: Graph) -> bool:
    return any(node.id in later.refs() for later in graph.nodes[node.id + 1:])


def _check_grad(node: Node, ctx: RuleContext) -> None:
    arg = node.args[0] if node.args else None
    if not isinstance(arg, Ref) or ctx.graph.nodes[arg.id].op != "output":
        raise fail("grad_target", "'.grad' exists only on a module's output read (layer.output.grad)", node)


def _check_keywords(node: Node) -> None:
    """Keywords no call may pass: a device (the server decides where tensors live) or a buffer to write."""
    if "device" in node.kwargs:
        raise fail("device_move", f"{node.target} may not choose a device: the server decides where tensors live",
                   node)
    if "out" in node.kwargs or node.kwargs.get("inplace", False) is not False:
        raise fail("argument_not_allowed", f"{node.target}: out= and inplace= write into an existing tensor, "
                   "which graphs may not do this way; drop them and use the returned value", node)


def _check_writing_argument(node: Node, name: str, index: int) -> None:
    value = node.args[index] if len(node.args) > index else node.kwargs.get(name)
    if value is not None and value is not False:
        raise fail("argument_not_allowed", f"{node.target}: {name} writes into an existing tensor; drop it and "
                   "use the returned value", node)


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
    if "size" in node.kwargs:
        sizes: tuple[Any, ...] = (node.kwargs["size"],)
    elif name == "torch.randint":
        sizes = node.args[-1:] if node.args else ()    # randint(high, size) or randint(low, high, size)
    elif name == "torch.eye":                          # eye(n) is n x n, eye(n, m) is n x m
        n = node.args[0] if node.args else node.kwargs.get("n")
        m = node.args[1] if len(node.args) > 1 else node.kwargs.get("m", n)
        sizes = (n, m)
    elif name == "torch.full":
        sizes = node.args[:1]
    else:
        sizes = node.args
    _check_sizes(node, sizes, ctx)


def _check_sized_function(node: Node, ctx: RuleContext) -> None:
    name = node.target or ""
    param, index = SIZED_FUNCTIONS[name]
    value = node.args[index] if len(node.args) > index else node.kwargs.get(param)
    if name == "torch.nn.functional.pad":
        # each padded dimension grows by its two pads: bound the growth like repeat()'s factors
        pads = value if isinstance(value, (list, tuple)) else None
        if pads is None or any(literal_int(p) is None for p in pads):
            raise fail("factory_size", f"{name}: pads must be a literal list of integers", node)
        growth = [1 + max(pads[i], 0) + max(pads[i + 1] if i + 1 < len(pads) else 0, 0)
                  for i in range(0, len(pads), 2)]
        _check_sizes(node, (growth,), ctx)
    elif name == "torch.nn.functional.one_hot" and (literal_int(value) or 0) < 1:
        raise fail("factory_size", f"{name}: num_classes must be given as a literal positive integer so the "
                   "server can bound the result's size", node)
    else:
        _check_sizes(node, (value,), ctx)


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
    positional = [v for v in node.args if not isinstance(v, torch.dtype)]
    if node.target == "torch.linspace":
        names: tuple[str, ...] = ("start", "end", "steps")
    else:
        names = ("end",) if len(positional) == 1 else ("start", "end", "step")
    bound = {**dict(zip(names, positional, strict=False)),
             **{k: v for k, v in node.kwargs.items() if k in ("start", "end", "step", "steps")}}
    if "end" not in bound or not all(_bounded_number(v) for v in bound.values()):
        raise fail("factory_size", f"{node.target}: bounds must be finite literal numbers", node)
    if node.target == "torch.linspace":
        count = bound.get("steps", 0)
    else:
        start, end, step = bound.get("start", 0), bound["end"], bound.get("step", 1)
        count = abs((end - start) / step) if step else math.inf
    if not isinstance(count, (int, float)) or count > ctx.limits.max_factory_elements:
        raise fail("factory_size", f"{node.target} would create more than {ctx.limits.max_factory_elements} "
                   "elements", node)


def _bounded_number(value: Any) -> bool:
    """A literal number torch can take as a bound: finite, and an int within int64 (10**400 overflows a float)."""
    if isinstance(value, bool):
        return False
    if isinstance(value, int):
        return -(2**63) <= value < 2**63
    return isinstance(value, float) and math.isfinite(value)


def _is_weight_view(node: Node, ctx: RuleContext) -> bool:
    if node.op == "param":
        return True
    if node.op == "call_function" and node.target in _WEIGHT_VIEW_FUNCTIONS:   # torch.t(w), einsum('ij->ji', w)
        return any(isinstance(a, Ref) and a.id in ctx.weight_views
                   for arg in node.args for a in (arg if isinstance(arg, (list, tuple)) else (arg,)))
    if not node.args or not isinstance(node.args[0], Ref) or node.args[0].id not in ctx.weight_views:
        return False
    return node.op in ("getitem", "getattr") or (node.op == "call_method" and node.target in VIEW_METHODS)


_WEIGHT_VIEW_FUNCTIONS = frozenset({
    "operator.getitem", "operator.pos", "torch.t", "torch.transpose", "torch.permute", "torch.reshape",
    "torch.flatten", "torch.squeeze", "torch.unsqueeze", "torch.select", "torch.narrow", "torch.diagonal",
    "torch.movedim", "torch.swapaxes", "torch.split", "torch.chunk", "torch.unbind", "torch.broadcast_to",
    "torch.einsum", "torch.nn.functional.dropout",
})

_BY_OP = {
    "call_function": _check_function,
    "call_method": _check_method,
    "getattr": _check_getattr,
    "param": _check_param,
    "grad": _check_grad,
    "set_grad": _check_grad,
    "apply": _check_apply,
    **{op: _check_path for op in _PATH_OPS},
}
