"""The public runner: how a graph meets a model. Batching invokes, tokenization, then ``run_graph``.

    runner = LanguageModelRunner(hf_model, tokenizer)
    results = runner.run(graph)                          # {node id: saved value}
    tokens, rows = runner.tokens(graph.invokes)          # the batch a server's co-batching merges
    batch = runner.batch(graph, tokens, rows)            # a Batch: call the model once on every row
    results = runner.run(graph, batch)

A local ``sc.Model``/``sc.LanguageModel`` runs its traces through one of these (``model.runner``); the
server's model worker and co-batching use the same object, so a graph runs on a server exactly as it
runs locally. ``ModuleRunner`` serves any ``nn.Module`` (tensor arguments concatenated along dim 0),
``LanguageModelRunner`` a causal LM (prompts tokenized and left padded, ``generate``).
"""
from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
from torch import nn

from validator.order import check_graph

from ..errors import TraceError
from ..graph import Graph, Invoke
from .executor import Executor
from .inputs import TokenBatch, pad_left, token_rows, unpadded_ids
from .run import Batch, device_of, run_graph

OnResult = Callable[[Executor, Any], None]
_GENERATE_DEFAULTS = {"do_sample": False}


class ModuleRunner:
    """Runs graphs on ``module``: its invokes' tensor arguments stacked into one call."""

    def __init__(self, module: nn.Module) -> None:
        self.module = module
        self.modules: dict[str, nn.Module] = dict(module.named_modules())
        self.module_names = frozenset(self.modules)

    @property
    def device(self) -> torch.device:
        """Where the module's parameters live (inputs and literals are moved there)."""
        return device_of(self.module)

    def check(self, graph: Graph) -> None:
        """The static checks a run needs (module paths, nested skips, time order)."""
        check_graph(graph, self.module_names)

    def batch(self, graph: Graph) -> Batch:
        """One call of the module on every invoke's rows."""
        args, kwargs, rows, size = concat_invokes(graph.invokes)
        module = self.module
        return Batch(call=lambda: module(*args, **kwargs), rows=rows, size=size)

    def run(self, graph: Graph, batch: Batch | None = None, on_result: OnResult | None = None) -> dict[int, Any]:
        """Check ``graph``, then run it over ``batch`` (default: ``self.batch(graph)``)."""
        self.check(graph)
        return run_graph(graph, self.module, batch if batch is not None else self.batch(graph), on_result,
                         modules=self.modules)

    def probe_batch(self, invokes: list[Invoke]) -> Batch:
        """A batch of ``invokes`` alone, for a probe forward (output tuple lengths)."""
        return self.batch(Graph(invokes=invokes))


class LanguageModelRunner(ModuleRunner):
    """Runs graphs on a causal LM: prompts tokenized and left padded into one batch; ``generate`` graphs."""

    def __init__(self, module: nn.Module, tokenizer: Any = None) -> None:
        super().__init__(module)
        self.tokenizer = tokenizer

    def tokens(self, invokes: list[Invoke]) -> tuple[TokenBatch, list[slice | None]]:
        """The padded batch of every invoke's input, and each invoke's rows (``[None]``: one invoke, all rows)."""
        if len(invokes) == 1 and len(invokes[0].args) == 1:
            whole = unpadded_ids(invokes[0].args[0])
            if whole is not None:
                return whole, [None]
        all_rows: list[tuple[list[int], list[int]]] = []
        rows: list[slice | None] = []
        for inv in invokes:
            if len(inv.args) != 1:
                raise TraceError("a language-model invoke takes exactly one input (a prompt, ids, or a dict)")
            inv_rows = token_rows(inv.args[0], self.tokenizer)
            rows.append(slice(len(all_rows), len(all_rows) + len(inv_rows)))
            all_rows.extend(inv_rows)
        if len(rows) == 1:
            rows = [None]
        return pad_left(all_rows, self.pad_id()), rows

    def batch(self, graph: Graph, tokens: TokenBatch | None = None,
              rows: list[slice | None] | None = None) -> Batch:
        """The forward (``trace``) or generation (``generate``) over ``tokens`` (default: the graph's own)."""
        if tokens is None or rows is None:
            tokens, rows = self.tokens(graph.invokes)
        if graph.kind == "generate":
            return self._generate_batch(graph, tokens, rows)
        return self._trace_batch(graph, tokens, rows)

    def run(self, graph: Graph, batch: Batch | None = None, on_result: OnResult | None = None) -> dict[int, Any]:
        """As ``ModuleRunner.run``; a generation's token ids reach ``tracer.result`` nodes."""
        if on_result is None and graph.kind == "generate":
            on_result = deliver_result
        return super().run(graph, batch, on_result)

    def probe_batch(self, invokes: list[Invoke]) -> Batch:
        tokens, rows = self.tokens(invokes)
        return self._trace_batch(Graph(invokes=invokes), tokens, rows)

    def pad_id(self) -> int:
        """The padding token: the tokenizer's pad or end-of-sequence id, else the model config's, else 0."""
        tok = self.tokenizer
        config = getattr(self.module, "config", None)
        for candidate in (getattr(tok, "pad_token_id", None), getattr(tok, "eos_token_id", None),
                          getattr(config, "pad_token_id", None), getattr(config, "eos_token_id", None)):
            if isinstance(candidate, int):
                return candidate
        return 0

    def eos_ids(self) -> list[int]:
        """The token ids that end a generation (from the generation config, else the model config)."""
        config = getattr(self.module, "generation_config", None) or getattr(self.module, "config", None)
        eos = getattr(config, "eos_token_id", None)
        if isinstance(eos, int):
            return [eos]
        return [int(e) for e in eos] if isinstance(eos, (list, tuple)) else []

    def _trace_batch(self, graph: Graph, tokens: TokenBatch, rows: list[slice | None]) -> Batch:
        kwargs: dict[str, Any] = {"input_ids": tokens.input_ids, **call_kwargs(graph.invokes)}
        if tokens.padded:
            kwargs.update(attention_mask=tokens.attention_mask, position_ids=tokens.position_ids)
        device = self.device   # token ids are built on the CPU; the model may live on a GPU
        kwargs = {k: v.to(device) if isinstance(v, torch.Tensor) else v for k, v in kwargs.items()}
        module = self.module
        return Batch(call=lambda: module(**kwargs), rows=rows, size=tokens.input_ids.shape[0])

    def _generate_batch(self, graph: Graph, tokens: TokenBatch, rows: list[slice | None]) -> Batch:
        options = {**_GENERATE_DEFAULTS, **graph.options}
        module: Any = self.module
        pad = self.pad_id()
        device = self.device

        def call() -> Any:
            return module.generate(input_ids=tokens.input_ids.to(device), attention_mask=tokens.mask().to(device),
                                   pad_token_id=pad, **options)
        return Batch(call=call, rows=rows, size=tokens.input_ids.shape[0])


def deliver_result(executor: Executor, output: Any) -> None:
    """Hand a generation's token ids (``output.sequences`` or the tensor itself) to ``result`` nodes."""
    sequences = getattr(output, "sequences", output)
    executor.fire("", "result", sequences, step="all")


def call_kwargs(invokes: list[Invoke]) -> dict[str, Any]:
    """The keyword options every invoke of a language-model trace shares (they must be the same)."""
    first = invokes[0].kwargs
    if any(inv.kwargs.keys() != first.keys() for inv in invokes[1:]):
        raise TraceError("keyword options must be the same for every invoke of a trace")
    return dict(first)


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
