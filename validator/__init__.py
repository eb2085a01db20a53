"""The restricted graph format's rulebook: what the server agrees to run, and why not otherwise.

    from validator import validate, ModelSpec, Limits, ValidationError
    spec = ModelSpec.from_module(hf_model, name="smollm2-135m")
    checked = validate(graph_json, spec, Limits())
"""
from .shapes import ShapeTemplate, dry_run, meta_copy
from .spec import ModelSpec, ModuleSpec, TensorSpec
from .types import Limits, ValidatedGraph, ValidationError
from .validate import DryRun, validate

__all__ = [
    "DryRun", "Limits", "ModelSpec", "ModuleSpec", "ShapeTemplate", "TensorSpec", "ValidatedGraph",
    "ValidationError", "dry_run", "meta_copy", "validate",
]
