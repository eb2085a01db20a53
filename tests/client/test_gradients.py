"""Gradients inside a trace: `.grad` read and replaced, per invoke; weights never change.

Every expected value comes from raw hooks on the same hf model (refhooks.grad_of): retain_grad() on the
module output, register_hook for replaced gradients, loss.backward().
"""
from __future__ import annotations

import pytest
import torch
from conftest import lm_for
from refhooks import OTHER_IDS, PROMPT_IDS, grad_of, layer, params_snapshot

TOK = 6342  # ' Paris'
TOK_B = 11


@pytest.fixture
def lm(request, tiny_hf, gpt2_tokenizer):
    return lm_for(request, tiny_hf, gpt2_tokenizer)


@pytest.mark.parametrize("i", [0, 3])
def test_grad_of_layer_output_equals_retain_grad(lm, tiny_hf, arch, wire, i):
    with lm.trace(PROMPT_IDS):
        g = layer(lm, arch, i).output.grad.save()
        loss = lm.output.logits[0, -1, TOK]
        loss.backward()
    _, (expected,) = grad_of(tiny_hf, [layer(tiny_hf, arch, i)], lambda o: o.logits[0, -1, TOK], PROMPT_IDS)
    assert g.value.shape == expected.shape
    assert torch.equal(g.value, expected)


def test_grad_with_composite_loss_and_two_layers(lm, tiny_hf, arch, wire):
    # A loss built from several proxy ops; grads of two layers saved in backward order.
    with lm.trace(PROMPT_IDS):
        g3 = layer(lm, arch, 3).output.grad.save()
        g1 = layer(lm, arch, 1).output.grad.save()
        loss = -lm.output.logits[0, -1].log_softmax(-1)[TOK]
        loss.backward()
    _, (e1, e3) = grad_of(tiny_hf, [layer(tiny_hf, arch, 1), layer(tiny_hf, arch, 3)],
                          lambda o: -o.logits[0, -1].log_softmax(-1)[TOK], PROMPT_IDS)
    assert torch.equal(g1.value, e1)
    assert torch.equal(g3.value, e3)


@pytest.mark.parametrize("scale", [0.0, 3.0])
def test_replaced_grad_reaches_earlier_layer_like_a_tensor_hook(lm, tiny_hf, arch, wire, scale):
    with lm.trace(PROMPT_IDS):
        layer(lm, arch, 2).output.grad = layer(lm, arch, 2).output.grad * scale
        g1 = layer(lm, arch, 1).output.grad.save()
        lm.output.logits[0, -1, TOK].backward()
    _, (expected, _) = grad_of(tiny_hf, [layer(tiny_hf, arch, 1), layer(tiny_hf, arch, 2)],
                               lambda o: o.logits[0, -1, TOK], PROMPT_IDS,
                               grad_hooks={1: lambda g: g * scale})
    _, (unchanged,) = grad_of(tiny_hf, [layer(tiny_hf, arch, 1)], lambda o: o.logits[0, -1, TOK], PROMPT_IDS)
    assert torch.equal(g1.value, expected)
    assert not torch.equal(g1.value, unchanged)  # the replacement did change something
    if scale == 0.0:
        # layer 1's output reaches the logits only through layer 2 (the residual add is inside the block)
        assert not g1.value.any()


def test_grad_per_invoke_rows(lm, tiny_hf, arch, wire):
    with lm.trace() as tracer:
        with tracer.invoke(PROMPT_IDS):
            ga = layer(lm, arch, 1).output.grad.save()
            la = lm.output.logits[0, -1, TOK]
        with tracer.invoke(OTHER_IDS):
            gb = layer(lm, arch, 1).output.grad.save()
            lb = lm.output.logits[0, -1, TOK_B]
            (la + lb).backward()
    L1 = layer(tiny_hf, arch, 1)
    _, (ea,) = grad_of(tiny_hf, [L1], lambda o: o.logits[0, -1, TOK], PROMPT_IDS)
    _, (eb,) = grad_of(tiny_hf, [L1], lambda o: o.logits[0, -1, TOK_B], OTHER_IDS)
    assert ga.value.shape == ea.shape == (1, PROMPT_IDS.shape[1], ea.shape[-1])
    assert gb.value.shape == eb.shape
    # one batched forward vs two single ones: equal up to float reassociation
    torch.testing.assert_close(ga.value, ea, rtol=1e-4, atol=1e-6)
    torch.testing.assert_close(gb.value, eb, rtol=1e-4, atol=1e-6)


def test_grad_of_other_invokes_rows_is_zero(lm, tiny_hf, arch, wire):
    with lm.trace() as tracer:
        with tracer.invoke(PROMPT_IDS):
            ga = layer(lm, arch, 1).output.grad.save()
            la = lm.output.logits[0, -1, TOK]
        with tracer.invoke(OTHER_IDS):
            gb = layer(lm, arch, 1).output.grad.save()
            la.backward()  # a loss of the first invoke's rows only
    _, (ea,) = grad_of(tiny_hf, [layer(tiny_hf, arch, 1)], lambda o: o.logits[0, -1, TOK], PROMPT_IDS)
    torch.testing.assert_close(ga.value, ea, rtol=1e-4, atol=1e-6)
    assert gb.value.shape == ea.shape
    assert not gb.value.any()


def test_gradient_trace_leaves_weights_unchanged(lm, tiny_hf, arch, wire):
    for p in tiny_hf.parameters():
        p.grad = None
    before = params_snapshot(tiny_hf)
    with lm.trace(PROMPT_IDS):
        layer(lm, arch, 2).output.grad = layer(lm, arch, 2).output.grad * 2
        g = layer(lm, arch, 0).output.grad.save()
        lm.output.logits[0, -1, TOK].backward()
    assert g.value is not None
    after = params_snapshot(tiny_hf)
    assert all(torch.equal(before[k], after[k]) for k in before)
    assert all(p.requires_grad for p in tiny_hf.parameters())
    # Observed (not required by the SPEC): backward inside a trace leaves no .grad on the weights, so
    # repeated gradient traces neither accumulate state on the model nor hold weight-sized buffers.
    assert all(p.grad is None for p in tiny_hf.parameters())


def test_trace_without_backward_runs_without_autograd(lm, arch, wire):
    with lm.trace(PROMPT_IDS):
        h = layer(lm, arch, 1).output.save()
        logits = lm.output.logits.save()
    assert not h.value.requires_grad and h.value.grad_fn is None
    assert not logits.value.requires_grad
    assert torch.is_grad_enabled()  # the trace restored the global grad mode
