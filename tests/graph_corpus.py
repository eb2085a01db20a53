"""Real graphs recorded with sandbox_client on tiny models: seeds for schema checks and fuzzers.

    texts, spec = recorded_graphs()          # {name: Graph.to_json() text}, ModelSpec of the model
    validate(texts["edits"], spec)           # each one passes the validator, except "refused_*"

Between them the graphs use every op in ``sandbox_client.graph.OPS`` and every value tag.
Recording runs each trace once (tiny llama, 2 layers, ~0.3 s in all).
"""
from __future__ import annotations

import functools

import torch
from conftest import build_tiny

import sandbox_client as sc
from validator import ModelSpec

IDS = torch.tensor([[3, 14, 15, 92, 65, 35]])


def top_two(h, opts):
    out = []
    for i in range(2):
        out.append(h[:, i] * opts["scale"])
    return torch.stack(out)


@functools.lru_cache(maxsize=1)
def tiny_model() -> torch.nn.Module:
    """The model the graphs are recorded on: a random-weight llama, 2 layers, width 32."""
    return build_tiny("llama", layers=2, width=32)


@functools.lru_cache(maxsize=1)
def recorded_graphs() -> tuple[dict[str, str], ModelSpec]:
    hf = tiny_model()
    lm = sc.LanguageModel(hf)
    texts: dict[str, str] = {}

    with lm.trace(IDS) as tracer:
        h = lm.model.layers[0].output
        h[:, -1, :] = 0
        lm.model.layers[1].mlp.output = lm.model.layers[1].mlp.output * 2
        x = lm.model.layers[1].input
        x.add_(torch.ones(32))
        lm.model.layers[1].input = x
        logits = lm.output.logits
        logits[0, -1].topk(3).indices.save()
        torch.nn.functional.softmax(logits[..., 1:-1:2], dim=-1).save()
        shape = logits.to(torch.float16).reshape(torch.Size([6, -1])).shape.save()
        torch.where(logits > 0, logits, float("nan")).save()
        (logits[..., None, :4] + torch.tensor([1.0, 2.0, 3.0, float("inf")])).save()
    texts["edits"] = tracer.graph.to_json()

    with lm.trace(IDS) as tracer:   # a value saved by an earlier trace travels as a literal ($size here)
        lm.output.logits.reshape(shape).save()
    texts["earlier_value"] = tracer.graph.to_json()

    with lm.trace() as tracer:
        with tracer.invoke(IDS):
            lm.model.layers[0].mlp.skip(lm.model.layers[0].mlp.input)
            args_kwargs = lm.model.layers[1].inputs.save()
        with tracer.invoke([[5, 6, 7], [8, 9, 10]]):
            normed = lm.model.norm(lm.model.layers[1].output)
            lm.lm_head(normed).save()
            w = lm.model.layers[0].mlp.up_proj.weight
            (w.clone() * 0.5).sum().save()
        tracer.stop()
    texts["invokes_skip_stop"] = tracer.graph.to_json()
    assert args_kwargs is not None

    with lm.trace(IDS) as tracer:
        lm.model.layers[1].output.grad = lm.model.layers[1].output.grad * 0.5
        g = lm.model.layers[0].output.grad.save()
        lm.output.logits[0, -1, 7].backward()
        sc.apply(top_two, lm.model.layers[0].output, {"scale": 3.0}).save()
    texts["grad_apply"] = tracer.graph.to_json()
    assert g is not None

    with lm.generate(IDS, max_new_tokens=3) as tracer:
        with tracer.all_steps():
            lm.lm_head.output[:, -1].argmax(-1).save()
        with tracer.step(1):
            lm.model.layers[0].output[:] = lm.model.layers[0].output * 1.5
        tracer.result.save()
    texts["generate"] = tracer.graph.to_json()

    with lm.trace(IDS) as tracer:   # recorded and run locally; the validator refuses it (device_move)
        lm.model.layers[0].output.to(torch.device("cpu")).save()
    texts["refused_device_move"] = tracer.graph.to_json()

    return texts, ModelSpec.from_module(hf, name="tiny-llama")
