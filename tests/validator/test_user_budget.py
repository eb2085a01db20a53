"""user_budget: the exact edges of each bound (the hostile sources are in test_restricted.py)."""
from __future__ import annotations

import time

import pytest
import torch

from validator.user_budget import (
    MAX_ALLOCATED_BYTES,
    MAX_INT_BITS,
    MAX_ITERATIONS,
    MAX_SEQUENCE,
    UserFunctionBudget,
    UserFunctionError,
)


def test_int_bits_edge() -> None:
    budget = UserFunctionBudget()
    assert budget.binop("**", 2, MAX_INT_BITS - 1).bit_length() == MAX_INT_BITS
    assert budget.binop("<<", 1, MAX_INT_BITS - 1).bit_length() == MAX_INT_BITS
    with pytest.raises(UserFunctionError, match="bit limit"):
        budget.binop("**", 2, MAX_INT_BITS)
    with pytest.raises(UserFunctionError, match="bit limit"):
        budget.binop("<<", 1, MAX_INT_BITS)
    big = (1 << MAX_INT_BITS) - 1
    with pytest.raises(UserFunctionError, match="bit limit"):
        budget.binop("+", big, 1)
    with pytest.raises(UserFunctionError, match="bit limit"):
        budget.binop("*", big, 3)
    assert budget.binop("**", -1, 10**100) == 1 and budget.binop("**", 2, -10**9) == 0.0
    assert budget.binop("<<", 0, 10**100) == 0


def test_sequence_length_edge() -> None:
    budget = UserFunctionBudget()
    assert len(budget.binop("*", [0], MAX_SEQUENCE)) == MAX_SEQUENCE
    assert len(budget.binop("+", "a" * (MAX_SEQUENCE - 1), "b")) == MAX_SEQUENCE
    for op, left, right in (("*", [0], MAX_SEQUENCE + 1), ("*", MAX_SEQUENCE + 1, "a"),
                            ("+", (0,) * MAX_SEQUENCE, (1,)), ("*", [0], torch.tensor(MAX_SEQUENCE + 1))):
        with pytest.raises(UserFunctionError, match="items or characters"):
            budget.binop(op, left, right)
    assert budget.binop("*", [1, 2], -5) == []


def test_allocations_add_up() -> None:
    budget = UserFunctionBudget()
    block = [0] * (MAX_SEQUENCE // 2)
    with pytest.raises(UserFunctionError, match="MiB"):
        for _ in range(MAX_ALLOCATED_BYTES // (4 * MAX_SEQUENCE) + 2):
            budget.binop("+", block, block)


def test_in_place_list_ops_keep_aliasing() -> None:
    budget = UserFunctionBudget()
    items = [1]
    alias = items
    assert budget.inplace("+=", items, range(3)) is alias and alias == [1, 0, 1, 2]
    assert budget.inplace("*=", items, 2) is alias and len(alias) == 8
    tensor = torch.ones(2)
    assert budget.inplace("+=", tensor, 1) is not tensor and torch.equal(tensor, torch.ones(2))


def test_iterations_and_deadline() -> None:
    budget = UserFunctionBudget(deadline=time.monotonic() - 1)
    with pytest.raises(UserFunctionError, match="time limit"):
        list(budget.iterate(range(1000)))
    budget = UserFunctionBudget()
    budget.iterations = MAX_ITERATIONS - 3
    with pytest.raises(UserFunctionError, match="rows of a tensor"):
        budget.materialize(torch.zeros(4, 2))
    assert len(budget.materialize(torch.zeros(3, 2))) == 3
