"""Where a finished trace goes: run here, or only scanned for shapes. (A server: ``remote.RemoteBackend``.)

    with lm.trace("Hello"): ...                          # LocalBackend(lm.runner)
    with lm.scan("Hello"): ...                           # ScanBackend: meta tensors, nothing runs
    with lm.trace("Hello", backend=LocalBackend(lm.runner)): ...   # the same, spelled out

Each is a ``sandbox_client.types.Backend``: ``run(graph) -> {node id: saved value}``.
"""
from __future__ import annotations

from collections.abc import Callable

from torch import nn

from .errors import TraceError
from .graph import Graph, Ref
from .interpreter.runner import LanguageModelRunner, ModuleRunner
from .interpreter.shapes import ShapeTemplate, dry_run
from .types import Results

ShapeSource = Callable[[], tuple[ShapeTemplate, nn.Module]]   # (shape template, meta copy of the model)


class LocalBackend:
    """Runs the graph on this process's model (``runner``), with temporary hooks."""

    def __init__(self, runner: ModuleRunner) -> None:
        self.runner = runner

    def run(self, graph: Graph) -> Results:
        return self.runner.run(graph)


class ScanBackend:
    """Shapes without running: the graph's nodes replayed on meta tensors against the model's shape template.
    ``weights``: False for a model without weights here (a server's), where ad hoc module calls cannot run."""

    def __init__(self, runner: LanguageModelRunner, shapes: ShapeSource, weights: bool = True) -> None:
        self.runner = runner
        self.shapes = shapes
        self.weights = weights

    def run(self, graph: Graph) -> Results:
        if not self.weights and any(node.op == "call_module" for node in graph.nodes):
            raise TraceError("scan on a RemoteModel cannot call modules ad hoc (e.g. lm_head(x)): this machine has "
                             "no weights or model code. Scan with a local sc.LanguageModel, or trace remotely")
        self.runner.check(graph)
        tokens, rows = self.runner.tokens(graph.invokes)
        batch, seq = tokens.input_ids.shape
        values = dry_run(graph, *self.shapes(), batch=int(batch), seq=int(seq), rows=rows)
        saved = {a.id for n in graph.nodes if n.op == "save" for a in n.args if isinstance(a, Ref)}
        return {i: values[i] for i in saved if i in values and i >= 0}


class NoScan:
    """The scan backend of a generic ``sc.Model``: its inputs define no batch size or sequence length."""

    def run(self, graph: Graph) -> Results:
        raise TraceError("scan needs a sc.LanguageModel (its inputs define batch size and sequence length)")


class RecordOnly:
    """Runs nothing: the trace only records its graph (``tracer.graph``, e.g. to send or store it elsewhere).

        with lm.trace("Hello", backend=RecordOnly()) as tracer: ...
        tracer.graph.to_json()
    """

    def run(self, graph: Graph) -> Results:
        return {}
