"""The wire format: tracer.graph.to_json() <-> sc.Graph.from_json(), exact and pickle-free.

Round trips are checked on the text (from_json(s).to_json() == s), on graph equality, and on behaviour:
values that pass through literals (tensors of several dtypes, NaN/inf floats, slices, Ellipsis, None,
nested lists) come back bitwise equal to the plain-torch computation.
"""
from __future__ import annotations

import base64
import binascii
import json
import math
from collections.abc import Iterator
from typing import Any

import pytest
import torch
from conftest import build_tiny
from reference import assert_same, layer, mlp, run_hf, token_ids
from torch import nn

import sandbox_client as sc

ARCH = "gpt2"
PROMPT = "The Eiffel Tower is in the city of"
OTHER = "Hello world, this is a test"


@pytest.fixture(scope="module")
def hf() -> nn.Module:
    return build_tiny(ARCH)


@pytest.fixture(scope="module")
def lm(hf: nn.Module, gpt2_tokenizer: Any) -> Any:
    return sc.LanguageModel(hf, tokenizer=gpt2_tokenizer)


@pytest.fixture(scope="module")
def hidden(hf: nn.Module, gpt2_tokenizer: Any) -> torch.Tensor:
    _, (h,) = run_hf(hf, token_ids(gpt2_tokenizer, PROMPT), capture=[layer(hf, ARCH, 1)])
    return h


def json_strings(data: Any) -> Iterator[str]:
    if isinstance(data, str):
        yield data
    elif isinstance(data, list):
        for v in data:
            yield from json_strings(v)
    elif isinstance(data, dict):
        for k, v in data.items():
            yield k
            yield from json_strings(v)


def json_dicts(data: Any) -> Iterator[dict[str, Any]]:
    if isinstance(data, list):
        for v in data:
            yield from json_dicts(v)
    elif isinstance(data, dict):
        yield data
        for v in data.values():
            yield from json_dicts(v)


def strict_loads(text: str) -> Any:
    """json.loads that refuses NaN / Infinity tokens (not JSON per RFC 8259)."""
    def refuse(token: str) -> Any:
        raise ValueError(f"non-standard JSON constant {token}")
    return json.loads(text, parse_constant=refuse)


def assert_round_trips(graph: Any) -> str:
    text = graph.to_json()
    assert isinstance(text, str)
    again = sc.Graph.from_json(text)
    assert isinstance(again, sc.Graph)
    assert again.to_json() == text
    assert again == graph
    assert sc.Graph.from_json(again.to_json()) == again
    return text


# ---- text and equality round trips -------------------------------------------------------------

def test_simple_trace_graph_round_trips(lm: Any, wire: str) -> None:
    with lm.trace(PROMPT) as tracer:
        layer(lm, ARCH, 1).output.save()
        lm.output.logits.save()
    assert_round_trips(tracer.graph)


def test_edit_and_invoke_graph_round_trips(lm: Any, wire: str) -> None:
    with lm.trace() as tracer:
        with tracer.invoke(PROMPT):
            clean = layer(lm, ARCH, 2).output[:, -1, :]
            mlp(lm, ARCH, 0).output[:] = 0
        with tracer.invoke([OTHER, PROMPT]):
            m = mlp(lm, ARCH, 1)
            m.output = m.output * 2
            layer(lm, ARCH, 2).output[:, -1, :] = clean
            lm.lm_head(lm.transformer.ln_f(layer(lm, ARCH, 3).output)).save()
            values, indices = lm.output.logits[:, -1].topk(3)
            values.save()
            indices.save()
    assert_round_trips(tracer.graph)


def test_different_graphs_compare_unequal(lm: Any, wire: str) -> None:
    with lm.trace(PROMPT) as t1:
        layer(lm, ARCH, 1).output.save()
    with lm.trace(PROMPT) as t2:
        layer(lm, ARCH, 2).output.save()
    assert t1.graph != t2.graph
    assert t1.graph.to_json() != t2.graph.to_json()
    assert sc.Graph.from_json(t1.graph.to_json()) != t2.graph


def test_json_is_valid_and_pickle_free(lm: Any, wire: str) -> None:
    lit = torch.arange(64, dtype=torch.float32)
    with lm.trace(PROMPT) as tracer:
        (layer(lm, ARCH, 1).output + lit).save()
    text = assert_round_trips(tracer.graph)
    data = json.loads(text)
    assert "pickle" not in text.lower()
    # the tensor literal is an encoded JSON object, not a Python repr
    assert any(any("tensor" in key.lower() for key in d) for d in json_dicts(data)), text[:500]
    assert "tensor(" not in text
    for s in json_strings(data):
        if len(s) < 16:
            continue
        try:
            raw = base64.b64decode(s, validate=True)
        except (binascii.Error, ValueError):
            continue
        assert not raw.startswith(b"\x80"), "pickle protocol header inside the graph"
        assert not raw.startswith(b"PK\x03\x04"), "torch.save zip archive inside the graph"


def test_json_is_strict_rfc8259_even_with_nan_literals(lm: Any, wire: str) -> None:
    with lm.trace(PROMPT) as tracer:
        h = layer(lm, ARCH, 1).output
        torch.where(h > 0, h, float("nan")).save()
        h.clamp(min=float("-inf"), max=float("inf")).save()
    strict_loads(tracer.graph.to_json())


# ---- literal values survive the wire bitwise ------------------------------------------------------

LITERALS: dict[str, torch.Tensor] = {
    "float32": torch.randn(3, 5, generator=torch.Generator().manual_seed(0)),
    "float32_special": torch.tensor([float("nan"), float("inf"), float("-inf"), -0.0, 1e-45, 3.4e38]),
    "bfloat16": torch.randn(4, 7, generator=torch.Generator().manual_seed(1)).to(torch.bfloat16),
    "float16": torch.randn(6, generator=torch.Generator().manual_seed(2)).to(torch.float16),
    "float64": torch.randn(2, 2, dtype=torch.float64, generator=torch.Generator().manual_seed(3)),
    "int64": torch.tensor([[0, -1, 2**62, -(2**63)], [5, 6, 7, 8]], dtype=torch.int64),
    "bool": torch.tensor([True, False, True]),
    "scalar_0d": torch.tensor(2.5),
    "int_0d": torch.tensor(7),
    "non_contiguous": torch.arange(12.0).view(3, 4).t(),
    "empty": torch.zeros(0, 3),
}


@pytest.mark.parametrize("name", list(LITERALS))
def test_tensor_literal_round_trips_bitwise(name: str, lm: Any, wire: str) -> None:
    lit = LITERALS[name]
    with lm.trace(PROMPT) as tracer:
        h = layer(lm, ARCH, 1).output
        keep = h.sum() == h.sum()                     # a proxy that is True at run time
        out = torch.where(keep, lit, lit).save()      # the literal itself, selected at run time
    text = assert_round_trips(tracer.graph)
    assert_same(out.value, torch.where(torch.tensor(True), lit, lit))
    # the literal inside the decoded graph is still the same tensor: decoding and re-encoding is stable
    assert sc.Graph.from_json(text).to_json() == text


@pytest.mark.parametrize("value", [float("nan"), float("inf"), float("-inf"), -0.0, 1e-300, 5e-324])
def test_float_literal_round_trips(value: float, lm: Any, hidden: torch.Tensor, wire: str) -> None:
    with lm.trace(PROMPT) as tracer:
        h = layer(lm, ARCH, 1).output
        filled = torch.full_like(h, value).save()
        mixed = torch.where(h > 0, h, value).save()
    assert_round_trips(tracer.graph)
    assert_same(filled.value, torch.full_like(hidden, value))
    assert_same(mixed.value, torch.where(hidden > 0, hidden, value))
    if value == 0.0:
        assert math.copysign(1.0, filled.value.flatten()[0].item()) == math.copysign(1.0, value)


def test_index_literals_round_trip(lm: Any, hidden: torch.Tensor, wire: str) -> None:
    """slices (with None/negative/step), Ellipsis, None, lists and nested lists inside one graph."""
    with lm.trace(PROMPT) as tracer:
        h = layer(lm, ARCH, 1).output
        a = h[..., None, 1:-1:2].save()
        b = h[:, [0, 2, 4]][..., :3].save()
        c = h[0, slice(None, 5, None)].save()
        nested = torch.tensor([[1, 2], [3, 4]])
        d = (h[0, :2, :2] @ torch.tensor([[1.0, 0.0], [0.0, 2.0]]) + nested).save()
        e = h.permute([2, 0, 1]).reshape([64, -1]).save()
        f = torch.stack([h[0, i] for i in [1, 3]]).save()
        g = h.new_tensor([[0.5, -1.0], [2.0, 3.0]]).save()
    assert_round_trips(tracer.graph)
    nested_ref = torch.tensor([[1, 2], [3, 4]])
    assert_same(a.value, hidden[..., None, 1:-1:2])
    assert_same(b.value, hidden[:, [0, 2, 4]][..., :3])
    assert_same(c.value, hidden[0, :5])
    assert_same(d.value, hidden[0, :2, :2] @ torch.tensor([[1.0, 0.0], [0.0, 2.0]]) + nested_ref)
    assert_same(e.value, hidden.permute([2, 0, 1]).reshape([64, -1]))
    assert_same(f.value, torch.stack([hidden[0, 1], hidden[0, 3]]))
    assert_same(g.value, hidden.new_tensor([[0.5, -1.0], [2.0, 3.0]]))


def test_dtype_and_kwargs_literals_round_trip(lm: Any, hidden: torch.Tensor, wire: str) -> None:
    with lm.trace(PROMPT) as tracer:
        h = layer(lm, ARCH, 1).output
        a = h.to(dtype=torch.bfloat16).save()
        b = h.sum(dim=(0, 2), keepdim=True).save()
        c = torch.nn.functional.pad(h, (1, 2), value=-3.0).save()
    assert_round_trips(tracer.graph)
    assert_same(a.value, hidden.to(dtype=torch.bfloat16))
    assert_same(b.value, hidden.sum(dim=(0, 2), keepdim=True))
    assert_same(c.value, torch.nn.functional.pad(hidden, (1, 2), value=-3.0))


def test_malformed_json_is_refused(wire: str) -> None:
    with pytest.raises(Exception) as info:
        sc.Graph.from_json('{"nodes": [{"op": "__import__"}]}')
    assert not isinstance(info.value, (AttributeError, KeyError, TypeError, IndexError)), \
        f"expected a typed format error, got {type(info.value).__name__}: {info.value}"
    with pytest.raises(ValueError):  # json.JSONDecodeError or the package's format error
        sc.Graph.from_json("not json at all")
