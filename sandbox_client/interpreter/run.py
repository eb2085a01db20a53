"""Run a graph over one batched forward: the single entry point for local and remote runs.

    results = run_graph(graph, module, Batch(call=lambda: module(x), rows=[None], size=4))

Sets grad mode (no_grad unless the graph asks for gradients), installs hooks, runs the
model, checks every node ran, and removes everything it added, even on errors. Gradients
that a backward pass leaves on parameters are restored to what they were.
"""
from __future__ import annotations

import dataclasses
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from ..graph import Graph
from ..graph.walk import map_leaves
from .executor import Executor, StopForward
from .hooks import HookSession


@dataclass
class Batch:
    """How to run the model on all invokes at once, and which rows belong to each invoke."""

    call: Callable[[], Any]
    rows: list[slice | None]
    size: int
    isolated: bool = False   # several jobs share the batch: every value a node sees is cut to its rows


def literals_on(graph: Graph, device: torch.device) -> Graph:
    """The graph with every tensor literal in its nodes on ``device`` (values sent by the client, e.g. a patch
    taken from an earlier trace, arrive on the CPU; the model may live on a GPU). Unchanged on the CPU."""
    if device.type == "cpu":
        return graph
    nodes = [dataclasses.replace(n, args=_moved(n.args, device), kwargs=_moved(n.kwargs, device))
             for n in graph.nodes]
    return dataclasses.replace(graph, nodes=nodes)


def _moved(value: Any, device: torch.device) -> Any:
    return map_leaves(value, lambda v: v.to(device) if isinstance(v, torch.Tensor) else v)


def device_of(module: nn.Module) -> torch.device:
    """Where ``module``'s parameters live (the CPU for a module without any)."""
    param = next(module.parameters(), None)
    return param.device if param is not None else torch.device("cpu")


def needs_grad(graph: Graph) -> bool:
    return any(n.op in ("grad", "set_grad") or (n.op == "call_method" and n.target == "backward")
               for n in graph.nodes)


def run_graph(graph: Graph, module: nn.Module, batch: Batch,
              on_result: Callable[[Executor, Any], None] | None = None,
              modules: Mapping[str, nn.Module] | None = None) -> dict[int, Any]:
    """Execute ``graph`` while ``batch.call()`` runs ``module``; return {node id: saved value}.

    ``modules`` (path -> module, as ``dict(module.named_modules())``) saves looking paths up per run.
    """
    executor = Executor(graph, module, batch.rows, batch.size, isolated=batch.isolated)
    grad = needs_grad(graph)
    saved_grads = [(p, p.grad) for p in module.parameters()] if grad else []
    try:
        with torch.set_grad_enabled(grad), HookSession(executor, module, modules):
            executor.start()
            try:
                output = batch.call()
            except StopForward:
                output = None
            if on_result is not None and output is not None:
                on_result(executor, output)
        return executor.finish()
    finally:
        for param, old in saved_grads:
            param.grad = old
