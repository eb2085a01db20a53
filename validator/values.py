"""Walk the literal values inside a graph: nesting depth, string/list lengths, tensor bytes.

    stats = ValueStats(limits); stats.walk(node.args, node)
    stats.tensor_bytes
"""
from __future__ import annotations

import math
from typing import Any

import torch

from sandbox_client.graph import Node, Ref
from sandbox_client.graph.walk import leaves

from .types import Limits, ValidationError


class ValueStats:
    """Accumulates sizes over every value of a graph and refuses what is over a limit."""

    def __init__(self, limits: Limits) -> None:
        self.limits = limits
        self.tensor_bytes = 0

    def walk(self, value: Any, node: Node | None, depth: int = 0) -> None:
        kind = type(value)
        if kind in _LEAVES or value is None:
            return
        if kind is tuple and depth == 0:
            for v in value:
                if type(v) not in _LEAVES and v is not None:
                    break
            else:
                return   # the common case: a node's args are references and numbers
        if depth > self.limits.max_depth:
            raise _err("depth", f"values are nested more than {self.limits.max_depth} levels deep", node)
        if isinstance(value, (list, tuple)):
            if len(value) > self.limits.max_list_length:
                raise _err("list_length", f"a list has {len(value)} items (limit {self.limits.max_list_length})",
                           node)
            for v in value:
                self.walk(v, node, depth + 1)
        elif isinstance(value, dict):
            if len(value) > self.limits.max_list_length:
                raise _err("list_length", "a dict has too many entries", node)
            for k, v in value.items():
                self.walk(k, node, depth + 1)
                self.walk(v, node, depth + 1)
        elif isinstance(value, str):
            if len(value) > self.limits.max_string_length:
                raise _err("string_length", f"a string of {len(value)} characters is over the limit "
                           f"({self.limits.max_string_length})", node)
        elif isinstance(value, slice):
            self.walk((value.start, value.stop, value.step), node, depth + 1)
        elif isinstance(value, torch.Tensor):
            self.tensor_bytes += value.numel() * value.element_size()
            if self.tensor_bytes > self.limits.max_literal_tensor_bytes:
                raise _err("literal_bytes", f"tensor literals total more than {self.limits.max_literal_tensor_bytes} "
                           "bytes; send smaller tensors or compute them inside the graph", node)


_LEAVES = frozenset({Ref, int, float, bool, type(Ellipsis)})


def literal_int(value: Any) -> int | None:
    """The value as an int if it is a literal integer (not a reference, bool or float)."""
    if isinstance(value, int) and not isinstance(value, bool):
        return value
    return None


def is_finite_number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


def contains_ref(value: Any) -> bool:
    return any(isinstance(v, Ref) for v in leaves(value))


def _err(code: str, message: str, node: Node | None) -> ValidationError:
    return ValidationError(code, message, node=node.id if node else None, source=node.source if node else "")
