"""The restricted graph format's rulebook: what the server agrees to run, and why not otherwise.

    from validator import validate, ModelSpec, Limits, ValidationError
    spec = ModelSpec.from_module(hf_model, name="smollm2-135m")
    checked = validate(graph_json, spec, Limits())

Static only: nothing here runs a graph (the dry run on meta tensors is the interpreter's,
``sandbox_client.interpreter.validate_and_dry_run``). Names load on first use, so a process that
needs only ``Limits`` (the server's supervisor) never imports torch.
"""
from __future__ import annotations

from typing import TYPE_CHECKING

from sandbox_client.lazy import lazy_exports

if TYPE_CHECKING:
    from .check import validate
    from .order import check_graph
    from .restricted import compile_user_function
    from .spec import ModelSpec, ModuleSpec, TensorSpec
    from .types import Limits, ValidatedGraph, ValidationError

_WHERE = {
    "ModelSpec": ".spec", "ModuleSpec": ".spec", "TensorSpec": ".spec",
    "Limits": ".types", "ValidatedGraph": ".types", "ValidationError": ".types",
    "validate": ".check", "check_graph": ".order", "compile_user_function": ".restricted",
}
__all__ = [
    "Limits", "ModelSpec", "ModuleSpec", "TensorSpec", "ValidatedGraph", "ValidationError", "check_graph",
    "compile_user_function", "validate",
]

__getattr__, __dir__ = lazy_exports(__name__, globals(), _WHERE)
