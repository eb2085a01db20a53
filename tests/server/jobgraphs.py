"""Graphs of every kind of job for the worker and end-to-end tests, recorded on a local tiny GPT-2.

    graphs = job_graphs(lm)            # {"trace_edit": JSON text, "gradient": ..., "generate_steps": ..., ...}
    expected = run_locally(lm, graphs["trace_edit"])     # {"node id": value}, what the server must return

``lm`` is ``sc.LanguageModel(build_tiny("gpt2"), gpt2_tokenizer)``: the same weights as the server's
tiny-gpt2 (``serverproc.TINY_MODELS``). ``slow_graph`` makes a generation that runs for seconds (a
user function burns CPU at every step), for timeouts, cancels and killed workers.
"""
from __future__ import annotations

from typing import Any

import torch

import sandbox_client as sc
from sandbox_client.backends import RecordOnly
from sandbox_client.graph import Graph

PROMPT = "The Eiffel Tower is in the city of"
PARIS = 6342


def clip_norms(h, limit):   # noqa: ANN001, ANN201 - a user function: its source is sent as is
    out = h
    for i in range(2):  # noqa: B007 - names starting with _ are refused in user functions
        out = out * (limit / out.norm(dim=-1, keepdim=True).clamp(min=limit))
    return out


def burn(h):   # noqa: ANN001, ANN201
    total = 0
    for i in range(100000):
        total = total + i % 7
    return h[:, -1, :2] * 0 + total


def hog(h):   # noqa: ANN001, ANN201
    parts = [h[0, -1].repeat(2**20) * 1.0 for i in range(40)]
    return len(parts)


def job_graphs(lm: sc.LanguageModel) -> dict[str, str]:
    """One graph per kind of job; each touches the model differently (edits, backward, steps, skip, apply)."""
    h = lm.transformer.h
    graphs: dict[str, str] = {}
    with lm.trace(PROMPT) as tracer:
        h[1].output = h[1].output * 0.5
        h[2].output[:, -1].save()
        lm.lm_head.output[:, -1].save()
    graphs["trace_edit"] = tracer.graph.to_json()
    with lm.trace(PROMPT) as tracer:
        h[1].output.grad.save()
        lm.output.logits[0, -1, PARIS].backward()
    graphs["gradient"] = tracer.graph.to_json()
    with lm.generate(PROMPT, max_new_tokens=5) as tracer:
        with tracer.all_steps():
            lm.lm_head.output[:, -1].argmax(-1).save()
        with tracer.step(1):
            h[0].output = h[0].output * 0
        tracer.result.save()
    graphs["generate_steps"] = tracer.graph.to_json()
    with lm.trace(PROMPT) as tracer:
        h[1].skip(h[1].input)
        lm.lm_head.output[:, -1].save()
    graphs["skip"] = tracer.graph.to_json()
    with lm.trace(PROMPT) as tracer:
        h[1].output = sc.apply(clip_norms, h[1].output, 1.0)
        lm.lm_head.output[:, -1].save()
    graphs["apply"] = tracer.graph.to_json()
    return graphs


def logits_graph(lm: sc.LanguageModel, prompt: str = PROMPT) -> str:
    """A plain trace saving the last position's logits (checked against a raw forward)."""
    with lm.trace(prompt) as tracer:
        lm.lm_head.output[:, -1].save()
    return tracer.graph.to_json()


class Recorder(sc.LanguageModel):
    """Records graphs without running them (for jobs too slow or too big to run here)."""

    def trace(self, *args: Any, **kwargs: Any) -> sc.Tracer:
        return super().trace(*args, backend=RecordOnly(), **kwargs)

    def generate(self, *args: Any, **kwargs: Any) -> sc.Tracer:
        return super().generate(*args, backend=RecordOnly(), **kwargs)


def slow_graph(lm: sc.LanguageModel, max_new_tokens: int = 100) -> str:
    """A generation whose every step runs ``burn`` (~50-100 ms): 5-10 s in all, with module calls all along.
    (The tiny models have 128 positions: the prompt's 9 tokens plus 100 new ones stay within them.)"""
    rec = Recorder(lm.runner.module, lm.tokenizer)
    with rec.generate(PROMPT, max_new_tokens=max_new_tokens) as tracer:
        with tracer.all_steps():
            sc.apply(burn, rec.transformer.h[0].output).save()
    return tracer.graph.to_json()


def hog_graph(lm: sc.LanguageModel) -> str:
    """A trace whose user function allocates 40 x 256 MiB (10 GiB): far over any test memory cap."""
    rec = Recorder(lm.runner.module, lm.tokenizer)
    with rec.trace(PROMPT) as tracer:
        sc.apply(hog, rec.transformer.h[0].output).save()
    return tracer.graph.to_json()


def run_locally(lm: sc.LanguageModel, graph_json: str) -> dict[str, Any]:
    """What the server must return for this graph: {str(node id): value}, computed here."""
    return {str(k): v for k, v in lm.runner.run(Graph.from_json(graph_json)).items()}


def assert_same_values(got: Any, expected: Any) -> None:
    """Bitwise equality through lists, tuples and dicts of tensors."""
    if isinstance(expected, torch.Tensor):
        assert isinstance(got, torch.Tensor) and got.dtype == expected.dtype and torch.equal(got, expected)
    elif isinstance(expected, (list, tuple)):
        assert len(got) == len(expected)
        for a, b in zip(got, expected, strict=True):
            assert_same_values(a, b)
    elif isinstance(expected, dict):
        assert set(got) == set(expected)
        for k in expected:
            assert_same_values(got[k], expected[k])
    else:
        assert got == expected
