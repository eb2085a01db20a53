"""Errors: runtime failures name the user's line, bad paths suggest names, impossible orders are refused
before the model runs, and a proxy has no truth value.
"""
from __future__ import annotations

import sys
from pathlib import Path

import pytest
import torch
from conftest import lm_for
from refhooks import PROMPT_IDS, assert_no_hooks, count_calls, layer, walk

import sandbox_client as sc

HERE = Path(__file__).name


def next_line() -> int:
    """The caller's line number + 1: put it on the line just above the statement under test."""
    return sys._getframe(1).f_lineno + 1


@pytest.fixture
def lm(request, tiny_hf, gpt2_tokenizer):
    return lm_for(request, tiny_hf, gpt2_tokenizer)


def test_runtime_index_error_names_the_source_line(lm, tiny_hf, arch, wire):
    with pytest.raises(sc.InterventionError) as info:
        with lm.trace(PROMPT_IDS):
            h = layer(lm, arch, 1).output
            line = next_line()
            bad = h[:, :, 10**6]
            bad.save()
    assert f"{HERE}:{line}" in str(info.value), str(info.value)
    assert_no_hooks(tiny_hf)


def test_runtime_shape_error_names_the_source_line(lm, tiny_hf, arch, wire):
    with pytest.raises(sc.InterventionError) as info:
        with lm.trace(PROMPT_IDS):
            h = layer(lm, arch, 2).output
            line = next_line()
            layer(lm, arch, 2).output = h @ torch.ones(3, 5)
    assert f"{HERE}:{line}" in str(info.value), str(info.value)
    assert_no_hooks(tiny_hf)


def test_runtime_error_in_generic_model_names_the_line(wire):
    net = torch.nn.Sequential(torch.nn.Linear(4, 4), torch.nn.ReLU(), torch.nn.Linear(4, 2))
    model = sc.Model(net)
    with pytest.raises(sc.InterventionError) as info:
        with model.trace(torch.ones(3, 4)):
            line = next_line()
            model.output[:, 7].save()  # column 7 of a [3, 2] output
    assert f"{HERE}:{line}" in str(info.value), str(info.value)


# (parent path, misspelt child, the name the message should suggest)
MISSPELT = {
    "gpt2": [("transformer", "ln_ff", "ln_f"), ("transformer", "wtee", "wte"), ("", "lm_haed", "lm_head")],
    "llama": [("model", "layrs", "layers"), ("model", "nrom", "norm"), ("", "lm_haed", "lm_head")],
    "qwen2": [("model", "layrs", "layers"), ("model", "embed_tokns", "embed_tokens"),
              ("", "lm_haed", "lm_head")],
}


def test_wrong_child_name_suggests_the_nearest(lm, arch, wire):
    for parent, bad, suggest in MISSPELT[arch]:
        with lm.trace(PROMPT_IDS):
            with pytest.raises(sc.ModulePathError) as info:
                getattr(walk(lm, parent) if parent else lm, bad)
            layer(lm, arch, 0).output.save()  # the trace is still usable after the error
        assert suggest in str(info.value).replace(bad, ""), str(info.value)


@pytest.mark.parametrize("arch", ["llama", "qwen2"])
def test_model_dot_typos_suggest_layers_and_mlp(lm, wire, arch):
    with lm.trace(PROMPT_IDS):
        with pytest.raises(sc.ModulePathError) as info:
            lm.model.layrs  # noqa: B018
        assert "layers" in str(info.value)
        with pytest.raises(sc.ModulePathError) as info:
            lm.model.layers[0].mlpp  # noqa: B018
        assert "mlp" in str(info.value).replace("mlpp", "")
        lm.model.layers[0].output.save()


def test_wrong_submodule_name_suggests_mlp(lm, arch, wire):
    with lm.trace(PROMPT_IDS):
        with pytest.raises(sc.ModulePathError) as info:
            layer(lm, arch, 0).mlpp  # noqa: B018
        layer(lm, arch, 0).output.save()
    assert "mlp" in str(info.value).replace("mlpp", "")


def test_module_list_index_out_of_range(lm, arch, wire):
    with lm.trace(PROMPT_IDS):
        for index in (4, 10, -5):
            with pytest.raises(sc.ModulePathError):
                layer(lm, arch, index)
        layer(lm, arch, 0).output.save()


def test_impossible_order_is_refused_before_running(lm, tiny_hf, arch, wire):
    with count_calls(tiny_hf) as root_calls, count_calls(layer(tiny_hf, arch, 0)) as layer_calls:
        with pytest.raises(sc.OrderError) as info:
            with lm.trace(PROMPT_IDS):
                late = layer(lm, arch, 3).output
                layer(lm, arch, 1).output = late * 1
    assert root_calls == [] and layer_calls == [], "the model ran before the order error"
    assert "3" in str(info.value) and "1" in str(info.value)
    assert_no_hooks(tiny_hf)


def test_impossible_order_in_place_edit(lm, tiny_hf, arch, wire):
    with count_calls(tiny_hf) as root_calls:
        with pytest.raises(sc.OrderError):
            with lm.trace(PROMPT_IDS):
                layer(lm, arch, 0).output[:, 0] = layer(lm, arch, 2).output[:, 0]
    assert root_calls == []


def test_bool_of_a_proxy_is_a_trace_error(lm, arch, wire):
    with lm.trace(PROMPT_IDS):
        h = layer(lm, arch, 0).output
        with pytest.raises(sc.TraceError):
            bool(h.mean() > 0)
        with pytest.raises(sc.TraceError):
            if h.sum():
                pass
        h.save()


def test_value_before_block_end_is_not_ready(lm, arch, wire):
    with lm.trace(PROMPT_IDS):
        h = layer(lm, arch, 0).output.save()
        with pytest.raises(sc.ValueNotReadyError):
            h.value  # noqa: B018
    assert isinstance(h.value, torch.Tensor)


def test_error_classes_share_the_base():
    specific = (sc.TraceError, sc.ModulePathError, sc.OrderError, sc.InterventionError, sc.ValueNotReadyError)
    for cls in specific:
        assert issubclass(cls, sc.SandboxError)
