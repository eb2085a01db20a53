"""Graphs and comparisons shared by the co-batching tests: recorded jobs on tiny models and the check
that a merged run gives each job what it gets alone.

    graphs = [trace(lm, edit_and_read, ids(1)), trace(lm, edit_and_read, ids(2))]
    run = same_as_alone(lm, graphs)          # bitwise, or bitwise=False for within 1e-5 relative
"""
from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch

import sandbox_client as sc
from sandbox_client.graph import Graph
from sandbox_server import cobatch
from sandbox_server.cobatch import run_together

from .jobgraphs import Recorder, assert_same_values

WIDTH = 7


def ids(seed: int, rows: int = 1, width: int = WIDTH) -> torch.Tensor:
    return torch.randint(0, 50000, (rows, width), generator=torch.Generator().manual_seed(seed))


def layers(lm: sc.LanguageModel) -> Any:
    return lm.model.layers if hasattr(lm._module, "model") else lm.transformer.h


def hidden(out: Any) -> Any:
    return out[0] if isinstance(out, tuple) else out


def trace(lm: sc.LanguageModel, body: Callable[[Any], None], *prompts: Any) -> Graph:
    rec = Recorder(lm.runner.module, lm.tokenizer)
    with rec.trace() if len(prompts) > 1 else rec.trace(prompts[0]) as tracer:
        if len(prompts) > 1:
            for p in prompts:
                with tracer.invoke(p):
                    body(rec)
        else:
            body(rec)
    return Graph.from_json(tracer.graph.to_json())


def edit_and_read(lm: Any) -> None:
    h = layers(lm)
    h[1].output = h[1].output * 0.5
    h[2].output.save()
    lm.lm_head.output[:, -1].save()


def close(got: Any, expected: Any, rtol: float) -> None:
    if isinstance(expected, torch.Tensor):
        assert isinstance(got, torch.Tensor) and got.shape == expected.shape
        scale = expected.abs().max().clamp(min=1e-12)
        assert float((got - expected).abs().max() / scale) <= rtol
    elif isinstance(expected, (list, tuple)):
        assert len(got) == len(expected)
        for a, b in zip(got, expected, strict=True):
            close(a, b, rtol)
    elif isinstance(expected, dict):
        assert set(got) == set(expected)
        for k in expected:
            close(got[k], expected[k], rtol)
    else:
        assert got == expected


def same_as_alone(lm: sc.LanguageModel, graphs: list[Graph], bitwise: bool = True) -> cobatch.BatchRun:
    run = run_together(lm.runner, graphs)
    for i, graph in enumerate(graphs):
        if i in run.results:
            alone = lm.runner.run(graph)
            (assert_same_values if bitwise else lambda a, b: close(a, b, 1e-5))(run.results[i], alone)
    return run
