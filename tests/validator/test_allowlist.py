"""validator/allowlist.py: exact names only, none from a dangerous namespace, and every name real.

The references: ``sandbox_client.interpreter.targets`` (what the interpreter resolves), ``torch.Tensor``'s own
attributes, and ``inspect.signature`` for the argument positions the rules read.
"""
from __future__ import annotations

import doctest
import inspect

import pytest
import torch

import validator.allowlist as allowlist
from sandbox_client.interpreter.targets import resolve_function, target_name, tensor_method
from validator.allowlist import (
    ATTRIBUTES,
    CAST_METHODS,
    FACTORIES,
    FUNCTIONS,
    GENERATE_OPTIONS,
    SIZED_FUNCTIONS,
    SIZED_METHODS,
    TENSOR_METHODS,
    WRITING_ARGUMENTS,
)

FORBIDDEN_PREFIXES = (
    "os.", "sys.", "builtins.", "subprocess.", "importlib.", "pickle.", "numpy.", "functools.", "torch.load",
    "torch.save", "torch.hub", "torch.ops", "torch.classes", "torch.library", "torch.utils", "torch.distributed",
    "torch.empty", "torch.from_file", "torch.set_", "torch.manual_seed", "torch.cuda", "torch.jit", "torch.compile",
    "torch.Tensor", "torch.storage", "torch.backends", "torch.autograd",
)
FORBIDDEN_METHODS = {
    "storage", "untyped_storage", "data_ptr", "numpy", "tofile", "cuda", "cpu", "pin_memory", "share_memory_",
    "set_", "resize_", "resize_as_", "as_strided", "as_strided_", "type", "new_empty", "new_empty_strided",
    "register_hook", "register_post_accumulate_grad_hook", "retain_grad", "requires_grad_", "apply_", "map_",
    "storage_offset", "to_sparse", "_base", "record_stream", "is_shared", "module_load",
}
FORBIDDEN_OPTIONS = {"streamer", "logits_processor", "stopping_criteria", "assistant_model", "prefix_allowed_tokens_fn",
                     "generation_config", "synced_gpus", "num_beams", "output_scores", "past_key_values"}


def test_no_function_from_a_forbidden_namespace() -> None:
    bad = sorted(n for n in FUNCTIONS if n.startswith(FORBIDDEN_PREFIXES))
    assert bad == []


def test_names_are_exact_and_public() -> None:
    for name in FUNCTIONS:
        assert name == name.strip() and "__" not in name and " " not in name, name
        assert not any(part.startswith("_") for part in name.split(".")), name
    for name in TENSOR_METHODS:
        assert not name.startswith("_") and "__" not in name, name
    for name in ATTRIBUTES:
        assert not name.startswith("_"), name
    assert not TENSOR_METHODS & FORBIDDEN_METHODS
    assert not set(GENERATE_OPTIONS) & FORBIDDEN_OPTIONS


@pytest.mark.parametrize("name", sorted(FUNCTIONS))
def test_every_function_resolves(name: str) -> None:
    func = resolve_function(name)
    assert callable(func) and not isinstance(func, type)


def test_every_function_is_recorded_under_an_allowed_name() -> None:
    """The client names a function by object; if that name is not allowed, using it remotely always fails."""
    recorded = {name: target_name(resolve_function(name)) for name in FUNCTIONS}
    assert {n: r for n, r in recorded.items() if r not in FUNCTIONS} == {}


@pytest.mark.parametrize("name", sorted(TENSOR_METHODS))
def test_every_tensor_method_is_a_real_tensor_method(name: str) -> None:
    assert callable(getattr(torch.Tensor, name, None)), name
    assert tensor_method(name)


def test_tensor_attributes_exist() -> None:
    t = torch.ones(2, 2)
    for name in ("shape", "dtype", "T", "mT", "ndim", "real", "requires_grad", "is_leaf"):
        assert name in ATTRIBUTES
        getattr(t, name)


def test_the_sub_tables_name_allowed_targets() -> None:
    assert FACTORIES <= FUNCTIONS
    assert set(SIZED_FUNCTIONS) <= FUNCTIONS and set(WRITING_ARGUMENTS) <= FUNCTIONS
    assert SIZED_METHODS <= TENSOR_METHODS and CAST_METHODS <= TENSOR_METHODS
    assert not {n for n in FUNCTIONS if n.rpartition(".")[2].startswith("empty")}


@pytest.mark.parametrize("name", sorted(WRITING_ARGUMENTS))
def test_writing_argument_positions_match_the_signatures(name: str) -> None:
    param, index = WRITING_ARGUMENTS[name]
    params = list(inspect.signature(resolve_function(name)).parameters)
    assert params[index] == param, f"{name}: position {index} is {params[index]!r}, not {param!r}"


SIZED_SAMPLES = {   # name -> (input, a value for the sized argument)
    "torch.broadcast_to": (torch.ones(1), (3,)),
    "torch.multinomial": (torch.ones(3), 2),
    "torch.nn.functional.one_hot": (torch.tensor([1]), 4),
    "torch.nn.functional.pad": (torch.ones(2), (1, 2)),
}


@pytest.mark.parametrize("name", sorted(SIZED_FUNCTIONS))
def test_sized_argument_positions_match_the_functions(name: str) -> None:
    """The rules read the size at (keyword, position): both spellings must mean the same call."""
    param, index = SIZED_FUNCTIONS[name]
    func = resolve_function(name)
    first, size = SIZED_SAMPLES[name]
    assert index == 1
    assert func(first, size).shape == func(first, **{param: size}).shape


def test_every_function_with_a_writing_argument_is_listed() -> None:
    """Python-level functions that take out=/inplace= must be in WRITING_ARGUMENTS (builtins take out= by keyword,
    which the rules refuse for every call)."""
    missing = []
    for name in sorted(FUNCTIONS):
        try:
            params = list(inspect.signature(resolve_function(name)).parameters)
        except ValueError:
            continue
        if ("inplace" in params or "out" in params) and name not in WRITING_ARGUMENTS:
            missing.append(name)
    assert missing == []


def test_doctests() -> None:
    assert doctest.testmod(allowlist).failed == 0
