"""What each computing node does: calls, attributes, indexing, ad hoc module calls, parameters.

    value = run_op(ctx, node, args, kwargs)

Function targets resolve only inside the namespaces of ``targets.NAMESPACES``; methods only
if they are public torch.Tensor methods; attributes never start with an underscore. In-place
writes to a tensor that shares storage with a model weight are refused: a job must never
leave a lasting change on a shared model.
"""
from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from contextvars import ContextVar
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from ..graph import Node
from .rows import merge
from .targets import resolve_function, tensor_method

_MUTATING_FUNCTIONS = frozenset({"operator.setitem"})


@dataclass
class OpContext:
    """What ops need from the run: the model, the batch size, and whether hooks are paused."""

    module: nn.Module
    batch: int
    adhoc_depth: int = 0
    protect_weights: bool = True   # off only in shape-only dry runs on meta tensors (no real weights)
    deadline: float | None = None  # time.monotonic() by which user functions must finish their loops
    _weight_storages: set[int] | None = field(default=None, repr=False)

    def merge(self, old: Any, new: Any, rows: slice | None) -> Any:
        return merge(old, new, rows, self.batch)

    def check_writable(self, target: Any) -> None:
        if not isinstance(target, torch.Tensor) or not self.protect_weights:
            return
        if self._weight_storages is None:
            tensors = list(self.module.parameters()) + list(self.module.buffers())
            self._weight_storages = {t.untyped_storage().data_ptr() for t in tensors}
        if target.untyped_storage().data_ptr() in self._weight_storages:
            raise PermissionError("this would write into a model weight or buffer; weights are read-only: "
                                  "copy it first with .clone() if you need a modified version")


def run_op(ctx: OpContext, node: Node, args: tuple[Any, ...], kwargs: dict[str, Any]) -> Any:
    """Execute one computing node on resolved arguments."""
    op = node.op
    if kwargs and ("out" in kwargs or kwargs.get("inplace")):
        _check_writing_kwargs(ctx, args, kwargs)
    if op == "call_function":
        return resolve_function(node.target or "")(*args, **kwargs)
    if op == "call_method":
        return _call_method(ctx, node.target or "", args, kwargs)
    if op == "getattr":
        return _getattr(args[0], node.target or "")
    if op == "getitem":
        return args[0][args[1]]
    if op == "setitem":
        ctx.check_writable(args[0])
        args[0][args[1]] = args[2]
        return None
    if op == "call_module":
        return _call_module(ctx, node.target or "", args, kwargs)
    if op == "param":
        return _param(ctx.module, node.target or "")
    if op == "apply":
        from validator.restricted import compile_user_function  # RestrictedPython lives with the rules

        deadline = ctx.deadline if ctx.deadline is not None else _USER_DEADLINE.get()
        return compile_user_function(node.target or "", ctx.check_writable, deadline)(*args, **kwargs)
    raise ValueError(f"unknown op {op!r}")


_USER_DEADLINE: ContextVar[float | None] = ContextVar("sandbox_user_function_deadline", default=None)


@contextmanager
def user_function_deadline(deadline: float) -> Iterator[None]:
    """Bound user-function loops of every graph run inside the block by ``deadline`` (time.monotonic()).

        with user_function_deadline(time.monotonic() + 60):    # a server worker, around one job
            lm._run_graph(graph)
    """
    token = _USER_DEADLINE.set(deadline)
    try:
        yield
    finally:
        _USER_DEADLINE.reset(token)


def _check_writing_kwargs(ctx: OpContext, args: tuple[Any, ...], kwargs: dict[str, Any]) -> None:
    """out= and inplace=True write into an existing tensor: never into a weight (the validator refuses
    them outright; this is the run-time double check for graphs run without it)."""
    ctx.check_writable(kwargs.get("out"))
    if kwargs.get("inplace") and args:
        ctx.check_writable(args[0])


def _call_method(ctx: OpContext, name: str, args: tuple[Any, ...], kwargs: dict[str, Any]) -> Any:
    if not args:
        raise ValueError(f"method {name!r} needs an object to call it on")
    obj = args[0]
    if not isinstance(obj, torch.Tensor) or not tensor_method(name):
        raise TypeError(f"{name!r} is not a tensor method (called on a {type(obj).__name__})")
    if name.endswith("_"):
        ctx.check_writable(obj)
    return getattr(obj, name)(*args[1:], **kwargs)


def _getattr(obj: Any, name: str) -> Any:
    if not name or name.startswith("_"):
        raise AttributeError(f"attribute {name!r} cannot be read in a graph")
    return getattr(obj, name)


def _call_module(ctx: OpContext, path: str, args: tuple[Any, ...], kwargs: dict[str, Any]) -> Any:
    module = ctx.module.get_submodule(path) if path else ctx.module
    ctx.adhoc_depth += 1
    try:
        return module(*args, **kwargs)
    finally:
        ctx.adhoc_depth -= 1


def _param(module: nn.Module, name: str) -> torch.Tensor:
    path, _, attr = name.rpartition(".")
    owner = module.get_submodule(path) if path else module
    if attr in owner._parameters and owner._parameters[attr] is not None:
        return owner._parameters[attr].detach()  # type: ignore[union-attr]
    if attr in owner._buffers and owner._buffers[attr] is not None:
        return owner._buffers[attr].detach()  # type: ignore[union-attr]
    raise AttributeError(f"no parameter or buffer named {name!r}")
