"""Memory: unsaved intermediates are freed early, repeated traces do not leak, `del` frees the model.

References: raw forward hooks that keep only weakrefs to layer outputs (refhooks.WeakOutputs), gc counts of
live tensors and objects, tracemalloc for Python-level allocations.
"""
from __future__ import annotations

import gc
import tracemalloc
import weakref

import pytest
import torch
from conftest import build_tiny
from refhooks import PROMPT_IDS, WeakOutputs, layer, run_hf

import sandbox_client as sc

LAYERS = 12


def live_tensors() -> int:
    # type(o) rather than isinstance: isinstance probes some lazy torch objects and warns
    return sum(1 for o in gc.get_objects() if issubclass(type(o), torch.Tensor))


def test_unsaved_layer_outputs_are_freed_during_and_after_the_trace(arch, gpt2_tokenizer, wire):
    hf = build_tiny(arch, layers=LAYERS)
    lm = sc.LanguageModel(hf, tokenizer=gpt2_tokenizer)
    raw_layers = [layer(hf, arch, i) for i in range(LAYERS)]
    with WeakOutputs(raw_layers) as plain:
        run_hf(hf, PROMPT_IDS)
    # baseline: in a plain forward, at layer k only layer k-1's output (layer k's input) is alive
    assert max(plain.live_earlier) <= 1

    with WeakOutputs(raw_layers) as weak:
        with lm.trace(PROMPT_IDS):
            for i in range(LAYERS):
                n = layer(lm, arch, i).output.norm()
            last = n.save()
        gc.collect()
        alive_after = weak.alive()
    _, (e_last,) = run_hf(hf, PROMPT_IDS, capture=[raw_layers[-1]])
    assert torch.equal(last.value, e_last.norm())
    assert len(weak.live_earlier) == LAYERS
    assert max(weak.live_earlier) <= 2, f"live earlier outputs at each layer: {weak.live_earlier}"
    assert alive_after == [], f"layer outputs still alive after the trace: {alive_after}"


def test_saved_value_is_kept_and_others_freed(arch, gpt2_tokenizer, wire):
    hf = build_tiny(arch, layers=6)
    lm = sc.LanguageModel(hf, tokenizer=gpt2_tokenizer)
    raw_layers = [layer(hf, arch, i) for i in range(6)]
    with WeakOutputs(raw_layers) as weak:
        with lm.trace(PROMPT_IDS):
            h2 = layer(lm, arch, 2).output.save()
            for i in range(6):
                layer(lm, arch, i).output.mean()
        gc.collect()
        alive = weak.alive()
    assert alive in ([], [2])  # the saved value may be the very tensor layer 2 returned, or a copy
    _, (e2,) = run_hf(hf, PROMPT_IDS, capture=[raw_layers[2]])
    assert torch.equal(h2.value, e2)


def test_many_traces_do_not_grow_memory(gpt2_tokenizer, wire):
    hf = build_tiny("gpt2", layers=2)
    lm = sc.LanguageModel(hf, tokenizer=gpt2_tokenizer)
    ids = PROMPT_IDS[:, :4]

    def traces(n: int) -> None:
        for _ in range(n):
            with lm.trace(ids):
                layer(lm, "gpt2", 0).output[:, -1] = 0
                layer(lm, "gpt2", 1).output.norm().save()
                lm.output.logits[0, -1].argmax().save()

    traces(20)  # warm-up: caches that fill once
    gc.collect()
    tensors0, objects0 = live_tensors(), len(gc.get_objects())
    traces(120)
    tracemalloc.start()  # slows every allocation: only over the last 60 traces
    try:
        py0, _ = tracemalloc.get_traced_memory()
        traces(60)
        gc.collect()
        py1, _ = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    gc.collect()
    tensors1, objects1 = live_tensors(), len(gc.get_objects())
    assert tensors1 - tensors0 <= 2, f"live tensors grew {tensors0} -> {tensors1} over 180 traces"
    assert objects1 - objects0 < 180, f"gc objects grew {objects0} -> {objects1} over 180 traces"
    assert py1 - py0 < 64 * 1024, f"python allocations grew {py1 - py0} bytes over 60 traces"


@pytest.mark.parametrize("generic", [False, True])
def test_del_wrapper_and_model_frees_the_model(gpt2_tokenizer, arch, wire, generic):
    hf = build_tiny(arch)
    lm = sc.Model(hf) if generic else sc.LanguageModel(hf, tokenizer=gpt2_tokenizer)
    with lm.trace(PROMPT_IDS) as tracer:
        h = layer(lm, arch, 1).output.save()
        layer(lm, arch, 2).output[:] = 0
    kept = h.value  # a result tensor the user keeps must not pin the model
    model_ref, wrapper_ref = weakref.ref(hf), weakref.ref(lm)
    del lm, hf, tracer, h
    gc.collect()
    assert wrapper_ref() is None, "the wrapper is still referenced"
    assert model_ref() is None, "the hf model is still referenced"
    assert kept.shape[1] == PROMPT_IDS.shape[1]


def test_kept_result_proxy_does_not_pin_the_model(gpt2_tokenizer, wire):
    # Users keep the proxies (`h = ....save()`, then `h.value`); deleting the model must still free it.
    hf = build_tiny("gpt2")
    lm = sc.LanguageModel(hf, tokenizer=gpt2_tokenizer)
    with lm.trace(PROMPT_IDS):
        h = layer(lm, "gpt2", 1).output.save()
    model_ref = weakref.ref(hf)
    del lm, hf
    gc.collect()
    assert model_ref() is None, "a saved proxy kept after the trace keeps the hf model alive"
    assert isinstance(h.value, torch.Tensor)
