"""The restricted graph format's rulebook: what the server agrees to run, and why not otherwise.

    from validator import validate, ModelSpec, Limits, ValidationError
    spec = ModelSpec.from_module(hf_model, name="smollm2-135m")
    checked = validate(graph_json, spec, Limits())

Names load on first use, so a process that needs only ``Limits`` (the server's supervisor) never
imports torch.
"""
from __future__ import annotations

from typing import TYPE_CHECKING

from sandbox_client.lazy import lazy_exports

if TYPE_CHECKING:
    from .check import DryRun, dry_check, dry_run_key, validate
    from .shapes import ShapeTemplate, dry_run, meta_copy
    from .spec import ModelSpec, ModuleSpec, TensorSpec
    from .types import Limits, ValidatedGraph, ValidationError

_WHERE = {
    "ShapeTemplate": ".shapes", "dry_run": ".shapes", "meta_copy": ".shapes",
    "ModelSpec": ".spec", "ModuleSpec": ".spec", "TensorSpec": ".spec",
    "Limits": ".types", "ValidatedGraph": ".types", "ValidationError": ".types",
    "DryRun": ".check", "validate": ".check", "dry_check": ".check", "dry_run_key": ".check",
}
__all__ = [
    "DryRun", "Limits", "ModelSpec", "ModuleSpec", "ShapeTemplate", "TensorSpec", "ValidatedGraph",
    "ValidationError", "dry_check", "dry_run", "dry_run_key", "meta_copy", "validate",
]

__getattr__, __dir__ = lazy_exports(__name__, globals(), _WHERE)
