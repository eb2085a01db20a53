"""module.skip(value) and tracer.stop().

References: the same hf model with the module's forward monkeypatched (identity / constant), and raw forward
hooks counting calls.
"""
from __future__ import annotations

import pytest
import torch
from conftest import lm_for
from refhooks import (
    PROMPT_IDS,
    assert_no_hooks,
    constant_forward,
    count_calls,
    identity_forward,
    layer,
    mlp,
    run_hf,
)

import sandbox_client as sc


@pytest.fixture
def lm(request, tiny_hf, gpt2_tokenizer):
    return lm_for(request, tiny_hf, gpt2_tokenizer)


@pytest.mark.parametrize("i", [0, 2])
def test_identity_skip_equals_identity_forward(lm, tiny_hf, arch, wire, i):
    with count_calls(mlp(tiny_hf, arch, i)) as mlp_calls:
        with lm.trace(PROMPT_IDS):
            layer(lm, arch, i).skip(layer(lm, arch, i).input)
            logits = lm.output.logits.save()
    assert mlp_calls == []  # the skipped layer did not run
    with identity_forward(layer(tiny_hf, arch, i)):
        expected, _ = run_hf(tiny_hf, PROMPT_IDS)
    assert torch.equal(logits.value, expected.logits)
    plain, _ = run_hf(tiny_hf, PROMPT_IDS)
    assert not torch.equal(logits.value, plain.logits)


def test_skip_with_constant(lm, tiny_hf, arch, wire):
    hidden = tiny_hf.config.hidden_size
    const = torch.linspace(-1, 1, PROMPT_IDS.shape[1] * hidden).reshape(1, PROMPT_IDS.shape[1], hidden)
    with lm.trace(PROMPT_IDS):
        layer(lm, arch, 1).skip(const)
        h1 = layer(lm, arch, 1).output.save()
        logits = lm.output.logits.save()
    with constant_forward(layer(tiny_hf, arch, 1), const):
        expected, (e1,) = run_hf(tiny_hf, PROMPT_IDS, capture=[layer(tiny_hf, arch, 1)])
    assert torch.equal(h1.value, const)
    assert torch.equal(e1, const)
    assert torch.equal(logits.value, expected.logits)


def test_skip_restores_forward(lm, tiny_hf, arch, wire):
    before, _ = run_hf(tiny_hf, PROMPT_IDS)
    with lm.trace(PROMPT_IDS):
        layer(lm, arch, 1).skip(layer(lm, arch, 1).input)
        mlp(lm, arch, 2).skip(mlp(lm, arch, 2).input * 0)
    for module in (layer(tiny_hf, arch, 1), mlp(tiny_hf, arch, 2)):
        assert "forward" not in vars(module)
    assert_no_hooks(tiny_hf)
    after, _ = run_hf(tiny_hf, PROMPT_IDS)
    assert torch.equal(after.logits, before.logits)


def test_skip_inner_module_of_skipped_module_is_an_error(lm, tiny_hf, arch, wire):
    with pytest.raises(sc.SandboxError):
        with lm.trace(PROMPT_IDS):
            layer(lm, arch, 1).skip(layer(lm, arch, 1).input)
            mlp(lm, arch, 1).skip(mlp(lm, arch, 1).input)
    assert_no_hooks(tiny_hf)
    assert "forward" not in vars(layer(tiny_hf, arch, 1))


def test_stop_after_saving_layer_1(lm, tiny_hf, arch, wire):
    last = layer(tiny_hf, arch, -1)
    with count_calls(last) as last_calls, count_calls(tiny_hf.lm_head) as head_calls:
        with lm.trace(PROMPT_IDS) as tracer:
            h = layer(lm, arch, 1).output.save()
            tracer.stop()
    assert last_calls == [] and head_calls == []
    _, (expected,) = run_hf(tiny_hf, PROMPT_IDS, capture=[layer(tiny_hf, arch, 1)])
    assert torch.equal(h.value, expected)
    assert_no_hooks(tiny_hf)
