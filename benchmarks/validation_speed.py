"""How fast the validator answers: static rules on a 1,000-node graph, and the shape dry run on
SmolLM2-135M, beside the alternatives measured in the same run (a whole-model forward on the meta
device, and under FakeTensorMode with an attention mask).

    .venv/bin/python benchmarks/validation_speed.py [--rounds 50]

Goals (issue 3): static validation of 1,000 nodes <= 2 ms; dry run on SmolLM2 <= 50 ms.
"""
from __future__ import annotations

import argparse
import statistics
import time
from collections.abc import Callable
from typing import Any

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer, LlamaForCausalLM

import sandbox_client as sc
from sandbox_client.backends import RecordOnly
from sandbox_client.interpreter import DryRun, ShapeTemplate, meta_copy, validate_and_dry_run
from sandbox_client.pretrained import smollm2_folder
from validator import ModelSpec, validate


def median_ms(fn: Callable[[], Any], rounds: int) -> float:
    fn()
    times = []
    for _ in range(rounds):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return statistics.median(times) * 1000


def thousand_node_graph(lm: sc.LanguageModel, ids: torch.Tensor) -> sc.Graph:
    with lm.trace(ids, backend=RecordOnly()) as tracer:
        h = lm.model.layers[3].output
        layer = 0
        while len(tracer.nodes) < 1000:
            h = (h * 0.5 + lm.model.layers[layer % 30].output).softmax(-1)
            layer += 1
        h.save()
    return tracer.graph


def typical_graph(lm: sc.LanguageModel, ids: torch.Tensor) -> sc.Graph:
    with lm.trace(ids, backend=RecordOnly()) as tracer:
        for i in range(30):   # per-layer logit lens at the last token: 30 ad hoc norm + lm_head calls
            lm.lm_head(lm.model.norm(lm.model.layers[i].output[:, -1])).softmax(-1).save()
    return tracer.graph


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--rounds", type=int, default=30)
    args = parser.parse_args()
    torch.set_num_threads(1)
    folder = smollm2_folder()
    hf = AutoModelForCausalLM.from_pretrained(str(folder), dtype=torch.float32).eval()
    tok = AutoTokenizer.from_pretrained(str(folder))
    lm = sc.LanguageModel(hf, tokenizer=tok)
    ids = tok("The Eiffel Tower is in the city of", return_tensors="pt")["input_ids"]
    spec = ModelSpec.from_module(hf, name="smollm2-135m")
    big = thousand_node_graph(lm, ids)
    big_json = big.to_json()
    typical = typical_graph(lm, ids)
    start = time.perf_counter()
    template = ShapeTemplate.probe(hf, lambda b, t: {"input_ids": torch.randint(0, 49152, (b, t))})
    meta = meta_copy(hf)
    probe_s = time.perf_counter() - start
    dry = DryRun(template, meta, seq=ids.shape[1])
    with torch.device("meta"):
        meta_full = LlamaForCausalLM(hf.config).eval()
    mask = torch.ones_like(ids)

    def meta_forward() -> None:
        with torch.no_grad():
            meta_full(input_ids=ids.to("meta"))

    def fake_forward() -> None:
        from torch._subclasses.fake_tensor import FakeTensorMode

        with FakeTensorMode(allow_non_fake_inputs=True), torch.no_grad():
            hf(input_ids=ids, attention_mask=mask)

    rows = [
        ("static rules, 1,000 nodes (parsed Graph)", median_ms(lambda: validate(big, spec), args.rounds * 5), 2.0),
        ("parse + static rules, 1,000 nodes (JSON)", median_ms(lambda: validate(big_json, spec), args.rounds), None),
        ("static rules + dry run, 30-layer logit lens", median_ms(lambda: validate_and_dry_run(typical, spec, dry=dry),
                                                                    args.rounds), 50.0),
        ("baseline: whole forward on meta device", median_ms(meta_forward, max(args.rounds // 3, 5)), None),
        ("baseline: whole forward, FakeTensorMode + mask", median_ms(fake_forward, max(args.rounds // 6, 3)), None),
    ]
    print(f"SmolLM2-135M, {ids.shape[1]} tokens, 1 thread; "
          f"shape template probe (once per model): {probe_s * 1000:.0f} ms")
    print(f"{'what':50s} {'median ms':>10s} {'goal ms':>8s}  verdict")
    for name, ms, goal in rows:
        verdict = "" if goal is None else ("PASS" if ms <= goal else "FAIL")
        print(f"{name:50s} {ms:10.2f} {'' if goal is None else f'{goal:.0f}':>8s}  {verdict}")
    dry_ms, meta_ms, fake_ms = rows[2][1], rows[3][1], rows[4][1]
    print(f"dry run is {meta_ms / dry_ms:.1f}x faster than a meta forward, {fake_ms / dry_ms:.1f}x than FakeTensorMode")


if __name__ == "__main__":
    main()
