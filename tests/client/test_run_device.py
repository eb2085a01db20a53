"""Tensor literals in a graph follow the model's device (a patch sent from the client arrives on the CPU).

Reference: the literal tensors of a recorded graph, compared before and after ``literals_on``.
"""
from __future__ import annotations

import torch
from conftest import build_tiny

import sandbox_client as sc
from sandbox_client.interpreter.run import literals_on


def recorded_graph() -> sc.Graph:
    lm = sc.LanguageModel(build_tiny("gpt2", layers=1, width=32))
    patch = torch.arange(32.0)
    with lm.trace(torch.tensor([[1, 2, 3]])) as tracer:
        lm.transformer.h[0].output[:, -1] = patch
        (lm.transformer.h[0].output + torch.ones(32)).save()
        torch.cat([lm.transformer.h[0].output[:, -1], patch[None]], dim=0).save()
    return tracer.graph


def literals(value: object) -> list[torch.Tensor]:
    if isinstance(value, torch.Tensor):
        return [value]
    if isinstance(value, (list, tuple)):
        return [t for v in value for t in literals(v)]
    if isinstance(value, dict):
        return [t for v in value.values() for t in literals(v)]
    return []


def test_literals_move_to_the_models_device_and_keep_their_values() -> None:
    graph = recorded_graph()
    before = [t for n in graph.nodes for t in literals((n.args, n.kwargs))]
    assert len(before) >= 3
    moved = literals_on(graph, torch.device("meta"))
    after = [t for n in moved.nodes for t in literals((n.args, n.kwargs))]
    assert [t.device.type for t in after] == ["meta"] * len(before)
    assert [t.shape for t in after] == [t.shape for t in before]
    assert all(t.device.type == "cpu" for n in graph.nodes for t in literals((n.args, n.kwargs)))  # not mutated


def test_on_the_cpu_the_graph_is_untouched() -> None:
    graph = recorded_graph()
    assert literals_on(graph, torch.device("cpu")) is graph
