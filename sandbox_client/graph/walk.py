"""Walking the nested values of a graph (node arguments, invoke inputs, results): one helper for all.

    rebuilt = map_leaves(node.args, lambda v: Ref(v.id + 10) if isinstance(v, Ref) else v)
    ids = [v.id for v in leaves(node.kwargs) if isinstance(v, Ref)]

Containers are exactly ``list``, ``tuple``, ``dict`` (values) and ``slice`` (start, stop, step), the
ones the wire format has. Anything else, a namedtuple or a model output object included, is a leaf.
"""
from __future__ import annotations

from collections.abc import Callable, Iterator
from typing import Any


def map_leaves(value: Any, leaf: Callable[[Any], Any]) -> Any:
    """``value`` rebuilt with ``leaf`` applied to every leaf (containers keep their type)."""
    kind = type(value)
    if kind is list:
        return [map_leaves(v, leaf) for v in value]
    if kind is tuple:
        return tuple([map_leaves(v, leaf) for v in value])
    if kind is dict:
        return {k: map_leaves(v, leaf) for k, v in value.items()}
    if kind is slice:
        return slice(map_leaves(value.start, leaf), map_leaves(value.stop, leaf), map_leaves(value.step, leaf))
    return leaf(value)


def leaves(value: Any) -> Iterator[Any]:
    """Every leaf of ``value``, depth first, without recursion (deep nesting cannot exhaust the stack)."""
    stack = [value]
    while stack:
        item = stack.pop()
        kind = type(item)
        if kind is list or kind is tuple:
            stack.extend(reversed(item))
        elif kind is dict:
            stack.extend(reversed(list(item.values())))
        elif kind is slice:
            stack.extend((item.step, item.stop, item.start))
        else:
            yield item
