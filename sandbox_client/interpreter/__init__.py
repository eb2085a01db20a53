"""Executing a graph against a model: the layer the client and the server share.

    from sandbox_client.interpreter import LanguageModelRunner
    results = LanguageModelRunner(hf_model, tokenizer).run(graph)       # {node id: saved value}

``runner`` (batching, tokenization, the public entry point), ``run`` (one batched run with temporary
hooks), ``executor`` (dataflow over the graph's nodes), ``ops`` (what each op does), ``hooks``,
``rows`` (each invoke's rows), ``targets`` (callable names), ``inputs`` (tokens and padding),
``shapes`` (the per-model shape template and the meta-tensor dry run) and ``preflight`` (the dry-run
check after ``validator.validate``). Names load on first use.
"""
from __future__ import annotations

from typing import TYPE_CHECKING

from ..lazy import lazy_exports

if TYPE_CHECKING:
    from .executor import Executor, StopForward
    from .inputs import TokenBatch
    from .ops import user_function_deadline
    from .preflight import DryRun, dry_check, dry_run_key, validate_and_dry_run
    from .rows import Withheld
    from .run import Batch, needs_grad, run_graph
    from .runner import LanguageModelRunner, ModuleRunner, deliver_result
    from .shapes import ShapeTemplate, dry_run, meta_copy

_WHERE = {
    "DryRun": ".preflight", "dry_check": ".preflight", "dry_run_key": ".preflight",
    "validate_and_dry_run": ".preflight",
    "Executor": ".executor", "StopForward": ".executor", "TokenBatch": ".inputs",
    "user_function_deadline": ".ops", "Withheld": ".rows",
    "Batch": ".run", "needs_grad": ".run", "run_graph": ".run",
    "LanguageModelRunner": ".runner", "ModuleRunner": ".runner", "deliver_result": ".runner",
    "ShapeTemplate": ".shapes", "dry_run": ".shapes", "meta_copy": ".shapes",
}
__all__ = [
    "Batch", "DryRun", "Executor", "LanguageModelRunner", "ModuleRunner", "ShapeTemplate", "StopForward", "TokenBatch",
    "Withheld", "deliver_result", "dry_check", "dry_run", "dry_run_key", "meta_copy", "needs_grad", "run_graph",
    "user_function_deadline", "validate_and_dry_run",
]

__getattr__, __dir__ = lazy_exports(__name__, globals(), _WHERE)
