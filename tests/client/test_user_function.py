"""sc.apply: user functions run under RestrictedPython, locally as remotely, against manual computation."""
from __future__ import annotations

import pytest
import torch
from conftest import build_tiny

import sandbox_client as sc


@pytest.fixture(scope="module")
def lm_and_hf() -> tuple[sc.LanguageModel, torch.nn.Module]:
    hf = build_tiny("llama")
    return sc.LanguageModel(hf), hf


IDS = torch.tensor([[3, 14, 15, 92, 65, 35]])


def capture(hf: torch.nn.Module, layer: int) -> torch.Tensor:
    store = {}
    handle = hf.model.layers[layer].register_forward_hook(lambda m, a, o: store.setdefault("h", o))
    with torch.no_grad():
        hf(IDS)
    handle.remove()
    return store["h"]


def first_k_doubled(h, k):
    out = []
    for i in range(k):
        out.append(h[:, i] * 2)
    if h.sum() > 0:
        return torch.stack(out)
    return -torch.stack(out)


def clamp_norms(h, limit):
    norms = h.norm(dim=-1, keepdim=True)
    scale = torch.where(norms > limit, limit / norms, torch.ones_like(norms))
    return h * scale


def test_apply_with_loop_and_branch_matches_manual(lm_and_hf, wire: str) -> None:
    lm, hf = lm_and_hf
    with lm.trace(IDS):
        got = sc.apply(first_k_doubled, lm.model.layers[1].output, 3).save()
    h = capture(hf, 1)
    expected = torch.stack([h[:, i] * 2 for i in range(3)])
    expected = expected if h.sum() > 0 else -expected
    assert torch.equal(got.value, expected)


def test_apply_result_can_replace_an_output(lm_and_hf, wire: str) -> None:
    lm, hf = lm_and_hf
    with lm.trace(IDS):
        lm.model.layers[0].output = sc.apply(clamp_norms, lm.model.layers[0].output, 0.5)
        logits = lm.output.logits.save()

    def hook(m, a, o):
        norms = o.norm(dim=-1, keepdim=True)
        return o * torch.where(norms > 0.5, 0.5 / norms, torch.ones_like(norms))

    handle = hf.model.layers[0].register_forward_hook(hook)
    with torch.no_grad():
        expected = hf(IDS).logits
    handle.remove()
    assert torch.equal(logits.value, expected)


def reads_private(h):
    return h.storage()


def uses_module_global(h):
    return IDS


def writes_weight(w):
    w[0] = 0
    return w


@pytest.mark.parametrize("fn", [reads_private, uses_module_global], ids=["storage", "global"])
def test_refused_locally_like_remotely(lm_and_hf, wire: str, fn) -> None:
    lm, _ = lm_and_hf
    with pytest.raises(sc.InterventionError, match="user function"):
        with lm.trace(IDS):
            sc.apply(fn, lm.model.layers[0].output).save()


def test_user_function_cannot_write_a_weight(lm_and_hf, wire: str) -> None:
    lm, hf = lm_and_hf
    before = hf.lm_head.weight.clone()
    with pytest.raises(sc.InterventionError, match="weight"):
        with lm.trace(IDS):
            sc.apply(writes_weight, lm.lm_head.weight).save()
    assert torch.equal(hf.lm_head.weight, before)


def test_apply_needs_def_and_open_trace(lm_and_hf) -> None:
    lm, _ = lm_and_hf
    with pytest.raises(sc.TraceError):
        sc.apply(first_k_doubled, 1, 2)
    with pytest.raises(sc.TraceError):
        with lm.trace(IDS):
            sc.apply(lambda h: h, lm.model.layers[0].output)
