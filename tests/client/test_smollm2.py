"""Acceptance on the real SmolLM2-135M: known facts, each checked against raw hooks or a plain forward.

The expected tokens come from FACTS.md (measured with raw transformers code); every check here
also recomputes its reference with plain PyTorch hooks in the same test.
"""
from __future__ import annotations

from collections.abc import Callable
from typing import Any

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

import sandbox_client as sc
from sandbox_client.pretrained import smollm2_folder

pytestmark = [pytest.mark.smollm2, pytest.mark.slow]

EIFFEL = "The Eiffel Tower is in the city of"
COLOSSEUM = "The Colosseum is in the city of"
IOI = "When Mary and John went to the store, John gave a drink to"


@pytest.fixture(scope="module")
def smol() -> tuple[Any, Any, sc.LanguageModel]:
    folder = smollm2_folder()
    hf = AutoModelForCausalLM.from_pretrained(str(folder), dtype=torch.float32).eval()
    tok = AutoTokenizer.from_pretrained(str(folder))
    return hf, tok, sc.LanguageModel(hf, tokenizer=tok)


def token_id(tok: Any, text: str) -> int:
    ids = tok(text, add_special_tokens=False)["input_ids"]
    assert len(ids) == 1, ids
    return int(ids[0])


def raw_forward(hf: Any, ids: torch.Tensor, hooks: dict[Any, Callable[..., Any]]) -> torch.Tensor:
    handles = [m.register_forward_hook(fn) for m, fn in hooks.items()]
    try:
        with torch.no_grad():
            return hf(ids).logits
    finally:
        for h in handles:
            h.remove()


def test_last_layer_logit_lens_says_paris(smol: Any, wire: str) -> None:
    hf, tok, lm = smol
    paris = token_id(tok, " Paris")
    with lm.trace(EIFFEL):
        h = lm.model.layers[-1].output
        lens = lm.lm_head(lm.model.norm(h))[0, -1].save()
        logits = lm.output.logits.save()
    ids = tok(EIFFEL, return_tensors="pt")["input_ids"]
    with torch.no_grad():
        plain = hf(ids).logits
    assert torch.equal(logits.value, plain)
    # the lens on the last layer is the model's own prediction: norm + lm_head of the final state
    assert torch.allclose(lens.value, plain[0, -1], atol=1e-5)
    assert int(lens.value.argmax()) == paris


def test_ioi_predicts_mary(smol: Any, wire: str) -> None:
    hf, tok, lm = smol
    with lm.trace(IOI):
        top = lm.output.logits[0, -1].argmax(-1).save()
    assert int(top.value) == token_id(tok, " Mary")


def test_zeroing_late_mlps_kills_paris(smol: Any, wire: str) -> None:
    hf, tok, lm = smol
    paris = token_id(tok, " Paris")
    with lm.trace(EIFFEL):
        for i in range(15, 30):
            lm.model.layers[i].mlp.output[:] = 0
        prob = lm.output.logits[0, -1].softmax(-1)[paris].save()
    ids = tok(EIFFEL, return_tensors="pt")["input_ids"]

    def zero(m: Any, a: Any, o: torch.Tensor) -> torch.Tensor:
        return torch.zeros_like(o)

    ref = raw_forward(hf, ids, {hf.model.layers[i].mlp: zero for i in range(15, 30)})
    assert float(prob.value) < 0.05
    assert torch.equal(prob.value, ref[0, -1].softmax(-1)[paris])


@pytest.mark.parametrize("layer, expect", [(28, " Paris"), (23, " Paris"), (10, " Rome")])
def test_patching_eiffel_into_colosseum(smol: Any, wire: str, layer: int, expect: str) -> None:
    hf, tok, lm = smol
    clean_ids = tok(EIFFEL, return_tensors="pt")["input_ids"]
    corrupt_ids = tok(COLOSSEUM, return_tensors="pt")["input_ids"]
    assert clean_ids.shape == corrupt_ids.shape == (1, 9)
    with lm.trace() as tracer:
        with tracer.invoke(EIFFEL):
            clean = lm.model.layers[layer].output[:, -1]
        with tracer.invoke(COLOSSEUM):
            before = lm.model.layers[layer].output[:, -1].clone().save()
            lm.model.layers[layer].output[:, -1] = clean
            patched = lm.output.logits[0, -1].save()

    # reference: two plain passes with raw hooks
    store: dict[str, torch.Tensor] = {}

    def grab(m: Any, a: Any, o: torch.Tensor) -> None:
        store["clean"] = o[:, -1].clone()

    def put(m: Any, a: Any, o: torch.Tensor) -> torch.Tensor:
        o = o.clone()
        o[:, -1] = store["clean"]
        return o

    raw_forward(hf, clean_ids, {hf.model.layers[layer]: grab})
    ref = raw_forward(hf, corrupt_ids, {hf.model.layers[layer]: put})[0, -1]
    # batched (2 rows) vs single-row matmuls: same math, different kernel blocking
    assert torch.allclose(patched.value, ref, rtol=1e-4, atol=1e-4)
    assert int(patched.value.argmax()) == token_id(tok, expect)
    assert int(ref.argmax()) == token_id(tok, expect)
    with torch.no_grad():
        unpatched = hf(corrupt_ids).logits[0, -1]
    assert int(unpatched.argmax()) == token_id(tok, " Rome")
    assert before.value.shape == (1, hf.config.hidden_size)
