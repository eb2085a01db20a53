"""How big a nested Python value is once every shared part is expanded, as ``repr``, a JSON encoder or
``torch.tensor`` would expand it. ``[[0] * 1000] * 1000`` holds two lists (8 KB) but is a million items:

    item_count([[0] * 1000] * 1000)     # 1_000_000
    repr_size([[0] * 1000] * 1000)      # 4_004_002, an upper bound on len(repr(...)) == 3_002_000

Each distinct container is walked once (its size is memoized by id while the value is alive), so measuring
costs what the value occupies, not what it expands to. ``user_budget.py`` bounds user-function values by it.
"""
from __future__ import annotations

import itertools
import math
import sys
from collections.abc import Callable, ItemsView, Iterable, KeysView, ValuesView
from typing import Any

import torch

CONTAINERS = (list, tuple, dict)
VIEWS = (KeysView, ValuesView, ItemsView)
NUMBERS = frozenset({int, float, bool, type(None)})


def item_count(value: Any) -> int:
    """Elements of ``value`` with every shared list/tuple/dict counted each time it is reached, as a JSON
    encoder or ``torch.tensor`` sees it: ``[[0] * 1000] * 1000`` is 10**6 (a tensor counts once)."""
    return _expanded(value, lambda leaf: 1, 0, 0)


def repr_size(value: Any) -> int:
    """An upper bound on ``len(repr(value))``, shared sub-lists expanded as ``repr`` expands them."""
    return _expanded(value, _repr_weight, 2, 2)


def _repr_weight(value: Any) -> int:
    if isinstance(value, (str, bytes)):
        return 4 * len(value) + 3          # escapes: '\x00' is four characters
    if isinstance(value, bool) or value is None:
        return 5
    if isinstance(value, int):
        return value.bit_length() // 3 + 2
    if isinstance(value, float):
        return 24                          # '-1.2345678901234567e-308'
    if isinstance(value, torch.Tensor):    # summarized past 1,000 elements: three from each end of each dim
        shown = value.numel() if value.numel() <= 1000 else math.prod(min(d, 6) for d in value.shape)
        return (32 + 2 * value.dim()) * shown + 128   # a number, its separator, brackets and indentation
    return 64


def _expanded(value: Any, weight: Callable[[Any], int], per_container: int, per_item: int) -> int:
    """Walk each distinct list/tuple/dict (and dict view) once, adding up the size of every reference to it;
    a container met again inside itself (a cycle, printed ``[...]``) counts 8."""
    memo: dict[int, int] = {}
    active: set[int] = set()
    alive: list[Any] = []                  # the item lists of dict views: their ids must not be reused

    def walk(obj: Any) -> int:
        if not isinstance(obj, (*CONTAINERS, *VIEWS)):
            return weight(obj)
        key = id(obj)                      # every container here is reachable from value: ids are stable
        if key in memo:
            return memo[key]
        if key in active:
            return 8
        active.add(key)
        if isinstance(obj, VIEWS):         # dict_items([(k, v), ...]): measured as that list
            alive.append(list(obj))
            memo[key] = total = walk(alive[-1]) + 8 * per_container
            active.discard(key)
            return total
        kinds = set(map(type, obj)) if isinstance(obj, (list, tuple)) else {dict}
        if kinds <= NUMBERS:              # flat: each item weighs at most what the widest one does
            samples = [kind() for kind in kinds if kind is not int]   # 0.0, False, None
            if int in kinds:
                ints = obj if kinds <= {int, bool} else [v for v in obj if isinstance(v, int)]
                samples.append(1 << max(map(int.bit_length, ints)))
            total = per_container + len(obj) * (per_item + max(map(weight, samples), default=0))
        else:
            children: Iterable[Any] = itertools.chain.from_iterable(obj.items()) if isinstance(obj, dict) else obj
            total = per_container + sum(walk(child) + per_item for child in children)
        if type(obj) not in CONTAINERS and per_container:
            total += 64                    # a subclass's own repr: torch.Size([...]), ModelOutput(k=v, ...)
        active.discard(key)
        memo[key] = total
        return total

    try:
        return walk(value)
    except RecursionError:
        return sys.maxsize
