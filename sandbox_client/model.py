"""``sc.Model``: wrap any torch module so its internals can be traced. Wrapping changes nothing.

    model = sc.Model(my_module)
    with model.trace(x, mask=m):                 # calls my_module(x, mask=m)
        hidden = model.encoder.layers[0].output.save()
    hidden.value

Hooks exist only while a traced forward runs. With several invokes, tensor arguments are
concatenated along dim 0 and each invoke sees its own rows.
"""
from __future__ import annotations

from typing import Any

import torch
from torch import nn

from .envoy import Envoy
from .errors import TraceError
from .graph import Graph, Invoke, Node
from .interpreter.run import Batch, run_graph
from .order import check_graph
from .tracer import Tracer

_PAIR_METHODS = frozenset({"topk", "sort", "kthvalue", "mode", "median", "max", "min", "aminmax",
                           "std_mean", "var_mean", "slogdet", "frexp"})


class Model(Envoy):
    """A traceable view of ``module``; the module itself is never modified."""

    def __init__(self, module: nn.Module) -> None:
        if not isinstance(module, nn.Module):
            raise TypeError(f"sc.Model wraps a torch.nn.Module, got {type(module).__name__}")
        super().__init__(module, "", None)
        self._active: Tracer | None = None
        self._lengths: dict[str, int | None] | None = None
        self._modules_by_path = dict(module.named_modules())
        self._module_names = frozenset(self._modules_by_path)

    def trace(self, *args: Any, **kwargs: Any) -> Tracer:
        """Record interventions for one forward on ``args``/``kwargs`` (or on invokes added inside)."""
        return Tracer(self, "trace", args, kwargs)

    def scan(self, *args: Any, **kwargs: Any) -> Tracer:
        """Like ``trace``, but nothing runs: saved values are meta tensors with the right shapes and dtypes."""
        return Tracer(self, "trace", args, kwargs, scan=True)

    # ----- tracer protocol -----------------------------------------------------------------
    def _begin(self, tracer: Tracer) -> None:
        if self._active is not None:
            raise TraceError("a trace is already open on this model; traces cannot be nested")
        self._active = tracer

    def _end(self, tracer: Tracer) -> None:
        self._active = None

    def _run_graph(self, graph: Graph) -> dict[int, Any]:
        check_graph(graph, self._module_names)
        return run_graph(graph, self._module, self._batch(graph), modules=self._modules_by_path)

    def _scan_graph(self, graph: Graph) -> dict[int, Any]:
        raise TraceError("scan needs a sc.LanguageModel (its inputs define batch size and sequence length)")

    def _batch(self, graph: Graph) -> Batch:
        args, kwargs, rows, size = concat_invokes(graph.invokes)
        module = self._module
        return Batch(call=lambda: module(*args, **kwargs), rows=rows, size=size)

    def _value_length(self, node: Node) -> int | None:
        if node.op == "inputs":
            return 2
        if node.op == "call_method" and node.target in _PAIR_METHODS:
            return 2
        if node.op == "output" and self._active is not None:
            return self._output_lengths(self._active).get(node.target or "")
        return None

    def _output_lengths(self, tracer: Tracer) -> dict[str, int | None]:
        """Tuple lengths of every module's output, learned once from a probe forward on the trace's input."""
        if self._lengths is None:
            if not tracer.invokes:
                raise TraceError("unpacking a module output needs the trace's input first")
            self._lengths = probe_output_lengths(self._module, self._probe_batch(tracer.invokes[:1]))
        return self._lengths

    def _probe_batch(self, invokes: list[Invoke]) -> Batch:
        return self._batch(Graph(invokes=invokes))


def probe_output_lengths(module: nn.Module, batch: Batch) -> dict[str, int | None]:
    """Run one forward with hooks on every module, recording len() of tuple/list outputs."""
    lengths: dict[str, int | None] = {}
    handles = []
    for name, sub in module.named_modules():
        def hook(m: nn.Module, a: Any, out: Any, name: str = name) -> None:
            lengths.setdefault(name, len(out) if isinstance(out, (tuple, list)) else None)
        handles.append(sub.register_forward_hook(hook))
    try:
        with torch.no_grad():
            batch.call()
    finally:
        for h in handles:
            h.remove()
    return lengths


def concat_invokes(invokes: list[Invoke]) -> tuple[tuple[Any, ...], dict[str, Any], list[slice | None], int]:
    """Stack invokes into one call: tensors concatenated along dim 0, other arguments must agree."""
    if len(invokes) == 1:
        inv = invokes[0]
        return inv.args, inv.kwargs, [None], _rows_of(inv)
    first = invokes[0]
    for inv in invokes[1:]:
        if len(inv.args) != len(first.args) or set(inv.kwargs) != set(first.kwargs):
            raise TraceError("all invokes of a generic sc.Model must take the same arguments")
    args = tuple(_concat([inv.args[i] for inv in invokes]) for i in range(len(first.args)))
    kwargs = {k: _concat([inv.kwargs[k] for inv in invokes]) for k in first.kwargs}
    rows: list[slice | None] = []
    start = 0
    for inv in invokes:
        n = _rows_of(inv)
        rows.append(slice(start, start + n))
        start += n
    return args, kwargs, rows, start


def _rows_of(inv: Invoke) -> int:
    for value in (*inv.args, *inv.kwargs.values()):
        if isinstance(value, torch.Tensor) and value.dim() > 0:
            return int(value.shape[0])
    return 1


def _concat(values: list[Any]) -> Any:
    if all(isinstance(v, torch.Tensor) for v in values):
        return torch.cat(values, dim=0)
    if any(v != values[0] for v in values[1:]):
        raise TraceError("non-tensor arguments must be equal across invokes of a generic sc.Model")
    return values[0]
