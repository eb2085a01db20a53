"""Weights stay bit-identical: the validator refuses every way into them, and the interpreter
double-checks the write forms at run time for graphs run without a validator (local runs)."""
from __future__ import annotations

import json

import pytest
import torch
from conftest import build_tiny

import sandbox_client as sc
from sandbox_client.backends import RecordOnly
from validator import ModelSpec, ValidationError, validate

IDS = torch.tensor([[3, 14, 15, 92]])


@pytest.fixture(scope="module")
def setup():
    hf = build_tiny("llama", layers=2, width=32)
    return hf, sc.LanguageModel(hf), ModelSpec.from_module(hf)


def recorded(lm, body) -> str:
    with lm.trace(IDS) as tracer:
        body()
    return tracer.graph.to_json()


def test_runtime_refuses_out_into_a_weight(setup) -> None:
    hf, lm, spec = setup
    before = hf.lm_head.weight.clone()
    with pytest.raises(sc.InterventionError, match="weight"):
        with lm.trace(IDS):
            torch.add(lm.lm_head.weight, 1, out=lm.lm_head.weight)
    assert torch.equal(hf.lm_head.weight, before)


def test_runtime_refuses_inplace_activation_on_a_weight(setup) -> None:
    hf, lm, spec = setup
    before = hf.lm_head.weight.clone()
    with pytest.raises(sc.InterventionError, match="weight"):
        with lm.trace(IDS):
            torch.nn.functional.relu(lm.lm_head.weight, inplace=True)
    assert torch.equal(hf.lm_head.weight, before)


def test_weight_as_module_output_is_refused(setup) -> None:
    hf, lm, spec = setup
    with lm.trace(IDS, backend=RecordOnly()) as tracer:   # recorded only: the server refuses it before running
        lm.model.layers[0].mlp.down_proj.output = lm.model.layers[0].mlp.down_proj.weight
    with pytest.raises(ValidationError) as err:
        validate(tracer.graph.to_json(), spec)
    assert err.value.code == "write_to_weight"


def test_calling_the_whole_model_ad_hoc_is_refused(setup) -> None:
    hf, lm, spec = setup
    doc = json.loads(recorded(lm, lambda: lm.lm_head(lm.model.norm(lm.model.layers[0].output)).save()))
    call = next(n for n in doc["nodes"] if n["op"] == "call_module")
    call["target"] = ""
    with pytest.raises(ValidationError) as err:
        validate(json.dumps(doc), spec)
    assert err.value.code == "argument_not_allowed"


def test_long_hostile_names_are_not_echoed_whole(setup) -> None:
    hf, lm, spec = setup
    doc = json.loads(recorded(lm, lambda: lm.model.layers[0].output.softmax(-1).save()))
    call = next(n for n in doc["nodes"] if n["op"] == "call_method")
    call["target"] = "x" * 100_000
    with pytest.raises(ValidationError) as err:
        validate(json.dumps(doc), spec)
    assert len(str(err.value)) < 2_000
