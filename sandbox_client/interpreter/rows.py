"""Batch rows of an invoke: narrow a value to them, and merge a replacement back in.

    >>> narrow(torch.zeros(5, 3), slice(2, 4), batch=5).shape
    torch.Size([2, 3])
    >>> merge(torch.zeros(5, 3), torch.ones(2, 3), slice(2, 4), batch=5)[:, 0]
    tensor([0., 0., 1., 1., 0.])

``rows`` is None when a node sees the whole batch (one invoke, or a node outside any
invoke): then values pass through untouched, with no copy and no cost.
"""
from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch


def narrow(value: Any, rows: slice | None, batch: int) -> Any:
    """The part of ``value`` that belongs to ``rows``: tensors whose first dim is the batch are sliced (views)."""
    if rows is None:
        return value
    if isinstance(value, torch.Tensor):
        return value[rows] if value.dim() > 0 and value.shape[0] == batch else value
    if isinstance(value, tuple) and not hasattr(value, "_fields"):
        return tuple(narrow(v, rows, batch) for v in value)
    if isinstance(value, list):
        return [narrow(v, rows, batch) for v in value]
    if isinstance(value, Mapping):
        return _rebuild_mapping(value, {k: narrow(v, rows, batch) for k, v in value.items()})
    return value


class SharedValueError(Exception):
    """A node used a value that holds rows of other jobs and cannot be cut to its own (an opaque object such
    as a key/value cache). Raised only in isolated (co-batched) runs: the job must run alone."""


class Withheld:
    """Stands in, in an isolated run, for an opaque value (e.g. a key/value cache) that holds every job's rows:
    any use (attributes, items, comparison, printing) raises ``SharedValueError``, so a node that needs it
    fails and its job runs again alone."""

    __slots__ = ("kind",)

    def __init__(self, kind: str) -> None:
        self.kind = kind

    def _refuse(self, *args: Any, **kwargs: Any) -> Any:
        raise SharedValueError(f"a {self.kind} holds every job's rows of a shared batch")

    def __getattr__(self, name: str) -> Any:
        if name.startswith("__"):
            raise AttributeError(name)
        return self._refuse()

    __getitem__ = __setitem__ = __iter__ = __len__ = __bool__ = __call__ = _refuse
    __eq__ = __ne__ = __lt__ = __le__ = __gt__ = __ge__ = __hash__ = _refuse
    __str__ = __repr__ = __format__ = _refuse


_PLAIN = (type(None), bool, int, float, complex, str, bytes, torch.dtype, torch.device, torch.Size)


def narrow_isolated(value: Any, rows: slice | None, batch: int, shared: list[torch.Tensor]) -> Any:
    """``narrow`` for a batch shared by several jobs: opaque objects become ``Withheld``; tensors without
    the batch as first dimension (a rotary table, a causal mask) pass whole and are appended to ``shared``,
    so that the executor can refuse an in-place write into them (it would reach every job)."""
    if isinstance(value, torch.Tensor):
        if rows is not None and not (value.dim() > 0 and value.shape[0] == batch):
            shared.append(value)
        return narrow(value, rows, batch)
    if isinstance(value, _PLAIN):
        return value
    if isinstance(value, (tuple, list)) and not hasattr(value, "_fields"):
        parts = [narrow_isolated(v, rows, batch, shared) for v in value]
        return parts if isinstance(value, list) else tuple(parts)
    if isinstance(value, Mapping):
        return _rebuild_mapping(value, {k: narrow_isolated(v, rows, batch, shared) for k, v in value.items()})
    return Withheld(type(value).__name__)


def merge(old: Any, new: Any, rows: slice | None, batch: int) -> Any:
    """``old`` with its ``rows`` replaced by ``new`` (a fresh value; autograd flows through both)."""
    if rows is None:
        return new
    if isinstance(old, torch.Tensor):
        if not (old.dim() > 0 and old.shape[0] == batch):
            raise ValueError("this value has no batch dimension, so one invoke cannot replace it alone")
        new_t = torch.as_tensor(new, dtype=old.dtype, device=old.device)
        width = rows.stop - rows.start
        part = new_t.expand(width, *old.shape[1:]) if new_t.shape[:1] != (width,) else new_t
        return torch.cat([old[: rows.start], part, old[rows.stop:]], dim=0)
    if isinstance(old, (tuple, list)) and isinstance(new, (tuple, list)) and len(old) == len(new):
        merged = [merge(o, n, rows, batch) for o, n in zip(old, new, strict=True)]
        return type(old)(merged) if isinstance(old, list) else tuple(merged)
    if isinstance(old, Mapping) and isinstance(new, Mapping):
        return _rebuild_mapping(old, {k: merge(v, new[k], rows, batch) if k in new else v for k, v in old.items()})
    raise ValueError(f"cannot replace one invoke's rows of a {type(old).__name__} with a {type(new).__name__}")


def _rebuild_mapping(original: Mapping[str, Any], items: dict[str, Any]) -> Any:
    if type(original) is dict:
        return items
    try:
        return type(original)(**items)
    except TypeError:
        return items
