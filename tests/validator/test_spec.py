"""validator/spec.py: a ModelSpec describes a model's module tree and tensor shapes, never its weights.

The reference is the model itself: ``named_modules()``, each module's ``_parameters``/``_buffers``.
"""
from __future__ import annotations

import json
from typing import Any

import pytest
import torch
from conftest import build_tiny
from torch import nn

from validator import ModelSpec, ModuleSpec, TensorSpec

ARCHS = ("gpt2", "llama", "qwen2")


@pytest.fixture(scope="module", params=ARCHS)
def model(request: pytest.FixtureRequest) -> nn.Module:
    return build_tiny(request.param, layers=2, width=32)


@pytest.fixture(scope="module")
def spec(model: nn.Module) -> ModelSpec:
    return ModelSpec.from_module(model, name="tiny")


def dtype_name(tensor: torch.Tensor) -> str:
    return str(tensor.dtype).removeprefix("torch.")


def test_every_module_path_is_in_the_spec(model: nn.Module, spec: ModelSpec) -> None:
    paths = [name for name, _ in model.named_modules(remove_duplicate=False)]
    assert set(spec.modules) == set(paths)
    assert "" in spec.modules


def test_module_types_and_children(model: nn.Module, spec: ModelSpec) -> None:
    for path, module in model.named_modules():
        entry = spec.modules[path]
        assert entry.type == type(module).__name__, path
        assert entry.children == tuple(name for name, _ in module.named_children()), path


def test_parameter_and_buffer_shapes_and_dtypes(model: nn.Module, spec: ModelSpec) -> None:
    seen = 0
    for path, module in model.named_modules():
        entry = spec.modules[path]
        params = dict(module.named_parameters(recurse=False))
        buffers = dict(module.named_buffers(recurse=False))
        assert set(entry.params) == set(params), path
        assert set(entry.buffers) == set(buffers), path
        for name, tensor in {**params, **buffers}.items():
            got = entry.params.get(name) or entry.buffers[name]
            assert got == TensorSpec(tuple(tensor.shape), dtype_name(tensor)), f"{path}.{name}"
            seen += 1
    assert seen >= len(list(model.parameters()))


def test_has_param_for_every_parameter_and_buffer_name(model: nn.Module, spec: ModelSpec) -> None:
    names = [n for n, _ in model.named_parameters(remove_duplicate=False)]
    names += [n for n, _ in model.named_buffers(remove_duplicate=False)]
    assert names and all(spec.has_param(n) for n in names)
    for path in list(spec.modules)[:10]:
        assert not spec.has_param(path), path                       # a module is not a parameter
    for bogus in ("", "weight", "lm_head.weights", "lm_head.weight.data", "lm_head.__dict__", "nope.weight"):
        assert not spec.has_param(bogus), bogus


def test_config_is_plain_json_with_vocab(spec: ModelSpec) -> None:
    assert spec.config["vocab_size"] == 50257
    assert json.loads(json.dumps(spec.config)) == spec.config


def test_round_trip_through_json(spec: ModelSpec) -> None:
    text = json.dumps(spec.to_dict())
    again = ModelSpec.from_dict(json.loads(text))
    assert again == spec
    assert json.dumps(again.to_dict()) == text
    assert again.modules["lm_head"].params["weight"] == spec.modules["lm_head"].params["weight"]


def walk(value: Any) -> list[Any]:
    found = [value]
    if isinstance(value, dict):
        for k, v in value.items():
            found += walk(k) + walk(v)
    elif isinstance(value, (list, tuple)):
        for v in value:
            found += walk(v)
    return found


def test_no_tensor_data_in_the_spec(spec: ModelSpec) -> None:
    leaves = walk(spec.to_dict())
    assert not any(isinstance(v, torch.Tensor) for v in leaves)
    assert all(v is None or isinstance(v, (str, int, float, bool, list, dict)) for v in leaves)
    for entry in spec.modules.values():
        for t in (*entry.params.values(), *entry.buffers.values()):
            assert isinstance(t, TensorSpec) and all(isinstance(d, int) for d in t.shape)


def test_spec_size_does_not_grow_with_the_weights() -> None:
    """Same architecture, 16x more parameters: the spec's JSON is the same size, give or take the digits."""
    small = json.dumps(ModelSpec.from_module(build_tiny("llama", layers=2, width=32)).to_dict())
    large = json.dumps(ModelSpec.from_module(build_tiny("llama", layers=2, width=128)).to_dict())
    assert abs(len(large) - len(small)) < 200
    assert len(small) < 50_000


def test_generic_module_spec() -> None:
    net = nn.Sequential(nn.Linear(4, 3, bias=False), nn.BatchNorm1d(3), nn.ReLU())
    spec = ModelSpec.from_module(net, name="net", kind="module")
    assert spec.kind == "module" and spec.config == {}
    assert spec.modules["0"] == ModuleSpec(type="Linear", params={"weight": TensorSpec((3, 4), "float32")})
    assert set(spec.modules["1"].buffers) == {"running_mean", "running_var", "num_batches_tracked"}
    assert spec.modules["1"].buffers["num_batches_tracked"] == TensorSpec((), "int64")
    assert not spec.has_param("0.bias")                           # bias=False: None, not listed
    assert ModelSpec.from_dict(json.loads(json.dumps(spec.to_dict()))) == spec
