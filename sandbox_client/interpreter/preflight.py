"""The dry run of a validated graph: its nodes on meta tensors against the model's shape template.

    checked = validate_and_dry_run(graph_json, spec, limits, DryRun(template, meta_model, seq=9))
    checked.result_bytes          # exact bytes of the saved values

Shape errors, replacements of the wrong shape, and saved values or intermediate activations over the
limits are reported before the model runs. Static rules come first (``validator.validate``); this part
executes the graph's own nodes, so it belongs to the interpreter, which the validator never imports.
"""
from __future__ import annotations

import dataclasses
import hashlib
from dataclasses import dataclass

from torch import nn

from validator.check import validate
from validator.spec import ModelSpec
from validator.types import Limits, ValidatedGraph, ValidationError

from ..graph import Graph, Invoke, Ref
from .shapes import EXTRA_BYTES, ShapeTemplate, dry_run, nbytes


@dataclass(frozen=True)
class DryRun:
    """What a shape dry run needs: the model's template, a meta copy, and the batch's token count.

    ``rows``: each invoke's rows in the batch (as ``LanguageModel._tokens`` gives them); None splits the
    batch evenly, which is exact only when every invoke has the same number of rows."""

    template: ShapeTemplate
    meta_model: nn.Module
    seq: int
    rows: list[slice | None] | None = None



def dry_check(checked: ValidatedGraph, dry: DryRun, limits: Limits | None = None) -> ValidatedGraph:
    """The dry-run part of ``validate`` for a graph that passed the static rules: ``checked`` with its exact
    ``result_bytes``, or ValidationError (shape errors, results or activations over the limits)."""
    total = _dry_run_bytes(checked.graph, dry, checked.rows, limits or Limits())
    return dataclasses.replace(checked, result_bytes=total)


def dry_run_key(graph: Graph, dry: DryRun, limits: Limits | None = None) -> str:
    """A digest of everything a dry run of ``graph`` reads, for one model's template and meta copy: the
    nodes, options and kind, each invoke's keyword arguments, the token count and rows, and the limits.
    The invokes' positional inputs (prompts, token ids) are left out: they reach the dry run only through
    ``dry.seq`` and ``dry.rows``. Two graphs with the same key pass or fail ``dry_check`` identically."""
    shape_only = Graph(kind=graph.kind, invokes=[Invoke(kwargs=inv.kwargs) for inv in graph.invokes],
                       nodes=graph.nodes, options=graph.options, version=graph.version)
    rows = [None if r is None else (r.start, r.stop, r.step) for r in (dry.rows or [])]
    digest = hashlib.sha256(shape_only.to_json().encode())
    digest.update(repr((dry.seq, dry.rows is None, rows, limits or Limits())).encode())
    return digest.hexdigest()


def _dry_run_bytes(graph: Graph, dry: DryRun, rows: int, limits: Limits) -> int:
    values = dry_run(graph, dry.template, dry.meta_model, batch=rows, seq=dry.seq, rows=dry.rows)
    saved = {a.id for n in graph.nodes if n.op == "save" for a in n.args if isinstance(a, Ref)}
    extra = values.get(EXTRA_BYTES, 0)
    if extra > limits.max_extra_activation_bytes:
        raise ValidationError("activation_memory", f"the graph's own computations would allocate about {extra} "
                              f"bytes (limit {limits.max_extra_activation_bytes}); reduce batch, sequence or "
                              "intermediate sizes")
    total = sum(nbytes(values.get(i)) for i in saved)
    if total > limits.max_result_bytes:
        raise ValidationError("result_too_large", f"the saved values total {total} bytes (limit "
                              f"{limits.max_result_bytes}); save slices (e.g. [:, -1]) instead of whole tensors")
    return total


def validate_and_dry_run(graph: Graph | str | bytes, spec: ModelSpec, limits: Limits | None = None,
                         dry: DryRun | None = None) -> ValidatedGraph:
    """``validator.validate``, then (with ``dry``) the dry run: what a server checks before queueing a job."""
    checked = validate(graph, spec, limits)
    return dry_check(checked, dry, limits) if dry is not None else checked
