"""``sc.LanguageModel``: a causal LM with a tokenizer; traces, batched invokes and generation.

    lm = sc.LanguageModel(smollm2_folder())          # or LanguageModel(hf_model, tokenizer=tok)
    with lm.generate("The capital of France is", max_new_tokens=5) as tracer:
        with tracer.all_steps():
            top = lm.lm_head.output[:, -1].argmax(-1).save()     # a list, one per step
        ids = tracer.result.save()
    lm.tokenizer.decode(ids.value[0])
"""
from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
from torch import nn

from .errors import TraceError
from .graph import Graph, Invoke, Ref
from .inputs import TokenBatch, pad_left, token_rows, unpadded_ids
from .interpreter.executor import Executor
from .interpreter.run import Batch, device_of, run_graph
from .model import Model
from .order import check_graph
from .tracer import Tracer

_GENERATE_DEFAULTS = {"do_sample": False}


class LanguageModel(Model):
    """A Hugging Face causal LM (object or local folder) with its tokenizer."""

    def __init__(self, model: nn.Module | str | Path, tokenizer: Any = None, **load_kwargs: Any) -> None:
        if isinstance(model, (str, Path)):
            model, tokenizer = _load_folder(Path(model), tokenizer, load_kwargs)
        super().__init__(model)
        self._tokenizer = tokenizer
        self._shapes: tuple[Any, nn.Module] | None = None

    @property
    def tokenizer(self) -> Any:
        return self._tokenizer

    def generate(self, *args: Any, max_new_tokens: int = 20, **kwargs: Any) -> Tracer:
        """Record interventions over a greedy generation of ``max_new_tokens`` tokens."""
        options = {"max_new_tokens": int(max_new_tokens), **kwargs}
        return Tracer(self, "generate", args, {}, options=options)

    def _run_graph(self, graph: Graph) -> dict[int, Any]:
        check_graph(graph, self._module_names)
        batch_tokens, rows = self._tokens(graph.invokes)
        if graph.kind == "generate":
            batch = self._generate_batch(graph, batch_tokens, rows)
            return run_graph(graph, self._module, batch, _deliver_result, modules=self._modules_by_path)
        batch = self._trace_batch(graph, batch_tokens, rows)
        return run_graph(graph, self._module, batch, modules=self._modules_by_path)

    def _scan_graph(self, graph: Graph) -> dict[int, Any]:
        """Shapes without running: replay the model's shape template with the graph's nodes on meta tensors."""
        from validator.shapes import dry_run  # the shape template lives with the validator's dry run

        check_graph(graph, self._module_names)
        tokens, rows = self._tokens(graph.invokes)
        batch, seq = tokens.input_ids.shape
        values = dry_run(graph, *self._shape_model(), batch=int(batch), seq=int(seq), rows=rows)
        saved = {a.id for n in graph.nodes if n.op == "save" for a in n.args if isinstance(a, Ref)}
        return {i: values[i] for i in saved if i in values and i >= 0}

    def _shape_model(self) -> tuple[Any, nn.Module]:
        if self._shapes is None:
            from validator.shapes import ShapeTemplate, meta_copy

            vocab = int(getattr(getattr(self._module, "config", None), "vocab_size", 2) or 2)
            template = ShapeTemplate.probe(
                self._module, lambda b, t: {"input_ids": torch.randint(0, vocab, (b, t))})
            self._shapes = (template, meta_copy(self._module))
        return self._shapes

    def _tokens(self, invokes: list[Invoke]) -> tuple[TokenBatch, list[slice | None]]:
        if len(invokes) == 1 and len(invokes[0].args) == 1:
            whole = unpadded_ids(invokes[0].args[0])
            if whole is not None:
                return whole, [None]
        all_rows: list[tuple[list[int], list[int]]] = []
        rows: list[slice | None] = []
        for inv in invokes:
            if len(inv.args) != 1:
                raise TraceError("a language-model invoke takes exactly one input (a prompt, ids, or a dict)")
            inv_rows = token_rows(inv.args[0], self._tokenizer)
            rows.append(slice(len(all_rows), len(all_rows) + len(inv_rows)))
            all_rows.extend(inv_rows)
        if len(rows) == 1:
            rows = [None]
        return pad_left(all_rows, self._pad_id()), rows

    def _trace_batch(self, graph: Graph, tokens: TokenBatch, rows: list[slice | None]) -> Batch:
        extra = _call_kwargs(graph.invokes)
        kwargs: dict[str, Any] = {"input_ids": tokens.input_ids, **extra}
        if tokens.padded:
            kwargs.update(attention_mask=tokens.attention_mask, position_ids=tokens.position_ids)
        device = device_of(self._module)   # token ids are built on the CPU; the model may live on a GPU
        kwargs = {k: v.to(device) if isinstance(v, torch.Tensor) else v for k, v in kwargs.items()}
        module = self._module
        return Batch(call=lambda: module(**kwargs), rows=rows, size=tokens.input_ids.shape[0])

    def _generate_batch(self, graph: Graph, tokens: TokenBatch, rows: list[slice | None]) -> Batch:
        options = {**_GENERATE_DEFAULTS, **graph.options}
        module: Any = self._module
        pad = self._pad_id()

        device = device_of(module)

        def call() -> Any:
            return module.generate(input_ids=tokens.input_ids.to(device), attention_mask=tokens.mask().to(device),
                                   pad_token_id=pad, **options)
        return Batch(call=call, rows=rows, size=tokens.input_ids.shape[0])

    def _probe_batch(self, invokes: list[Invoke]) -> Batch:
        tokens, rows = self._tokens(invokes)
        return self._trace_batch(Graph(invokes=invokes), tokens, rows)

    def _pad_id(self) -> int:
        tok = self._tokenizer
        for candidate in (getattr(tok, "pad_token_id", None), getattr(tok, "eos_token_id", None),
                          getattr(getattr(self._module, "config", None), "pad_token_id", None),
                          getattr(getattr(self._module, "config", None), "eos_token_id", None)):
            if isinstance(candidate, int):
                return candidate
        return 0


def _deliver_result(executor: Executor, output: Any) -> None:
    sequences = getattr(output, "sequences", output)
    executor.fire("", "result", sequences, step="all")


def _call_kwargs(invokes: list[Invoke]) -> dict[str, Any]:
    first = invokes[0].kwargs
    if any(inv.kwargs.keys() != first.keys() for inv in invokes[1:]):
        raise TraceError("keyword options must be the same for every invoke of a trace")
    return dict(first)


def _load_folder(folder: Path, tokenizer: Any, load_kwargs: dict[str, Any]) -> tuple[nn.Module, Any]:
    from transformers import AutoModelForCausalLM, AutoTokenizer

    if not folder.is_dir():
        raise FileNotFoundError(f"{folder} is not a folder; give a local Hugging Face model folder")
    model = AutoModelForCausalLM.from_pretrained(str(folder), **load_kwargs).eval()
    if tokenizer is None:
        tokenizer = AutoTokenizer.from_pretrained(str(folder))
    return model, tokenizer
