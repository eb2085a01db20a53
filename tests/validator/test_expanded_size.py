"""expanded_size: sizes of nested values with shared parts expanded, checked against repr and a naive walk."""
from __future__ import annotations

from typing import Any

import pytest
import torch

from validator.expanded_size import item_count, repr_size

_ROW = [0, -7, 2**100, 1.5, -1e-300, None, True, "a\x00b", b"\xff"]
_SHARED = [_ROW] * 3
_D = {1: "a", "k": [_ROW, (2, 3)]}
VALUES: dict[str, Any] = {
    "flat_ints": list(range(-500, 500)),
    "flat_mixed": _ROW,
    "shared_rows": [_SHARED, _SHARED, (_ROW,)],
    "dict": _D,
    "dict_views": [_D.items(), _D.keys(), _D.values()],
    "empty": [[], (), {}],
    "tensors": [torch.zeros(3), torch.ones(2, 1500), torch.arange(5) - 2**62, torch.zeros([2] * 12)],
    "size": torch.Size([2, 3]),
}


def _naive_count(value: Any) -> int:
    if isinstance(value, dict):
        return sum(_naive_count(k) + _naive_count(v) for k, v in value.items())
    if isinstance(value, (list, tuple)):
        return sum(_naive_count(v) for v in value)
    return 1


@pytest.mark.parametrize("name", sorted(VALUES))
def test_repr_size_bounds_repr(name: str) -> None:
    assert repr_size(VALUES[name]) >= len(repr(VALUES[name]))


@pytest.mark.parametrize("name", sorted(VALUES))
def test_item_count_expands_shared_parts(name: str) -> None:
    value = VALUES[name]
    naive = [list(view) for view in value] if name == "dict_views" else value
    assert item_count(value) == _naive_count(naive)


def test_shared_parts_are_walked_once() -> None:
    level = [0] * 1000
    for _ in range(6):           # 10**18 items expanded; measuring must not expand them
        level = [level] * 1000
    assert item_count(level) == 1000**7
    assert repr_size(level) > 1000**7


def test_cycles_and_deep_nesting_terminate() -> None:
    cycle: list[Any] = [1]
    cycle.append(cycle)
    assert repr_size(cycle) >= len(repr(cycle))
    deep: list[Any] = []
    for _ in range(100_000):
        deep = [deep]
    assert repr_size(deep) > 10**6    # too deep to print: counted as unbounded
