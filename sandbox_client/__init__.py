"""interp-sandbox client: trace interventions on a model's internals as a restricted graph.

    import sandbox_client as sc
    lm = sc.LanguageModel(hf_model, tokenizer=tok)
    with lm.trace("The Eiffel Tower is in the city of"):
        logits = lm.output.logits.save()
    logits.value

The graph (``tracer.graph``) is plain JSON (``to_json``/``Graph.from_json``); the same graph
runs locally (here) or on a server (``sc.RemoteModel("name", host=..., api_key=...)``).
Names load on first use (``sc.LanguageModel`` imports torch then), so a process that reads only the
graph format's plain parts does not pay for torch.
"""
from __future__ import annotations

from typing import TYPE_CHECKING

from .lazy import lazy_exports

if TYPE_CHECKING:
    from .envoy import Envoy
    from .errors import (
        AuthError,
        InterventionError,
        JobCancelled,
        JobError,
        JobTimeoutError,
        ModulePathError,
        OrderError,
        RateLimitError,
        RemoteError,
        RemoteValidationError,
        ResultVerificationError,
        SandboxError,
        TraceError,
        ValueNotReadyError,
    )
    from .graph import Graph, GraphFormatError, Node, Ref
    from .language_model import LanguageModel
    from .model import Model
    from .proxy import Proxy
    from .remote import RemoteJob, RemoteModel
    from .tracer import Tracer, json_roundtrip
    from .user_function import apply

_WHERE: dict[str, str] = {
    "apply": ".user_function", "Envoy": ".envoy", "Graph": ".graph", "GraphFormatError": ".graph", "Node": ".graph",
    "Ref": ".graph", "LanguageModel": ".language_model", "Model": ".model", "Proxy": ".proxy",
    "RemoteJob": ".remote", "RemoteModel": ".remote", "Tracer": ".tracer", "json_roundtrip": ".tracer",
    **dict.fromkeys(["AuthError", "InterventionError", "JobCancelled", "JobError", "JobTimeoutError",
                     "ModulePathError", "OrderError", "RateLimitError", "RemoteError", "RemoteValidationError",
                     "ResultVerificationError", "SandboxError", "TraceError", "ValueNotReadyError"], ".errors"),
}
__all__ = [
    "AuthError", "Envoy", "Graph", "GraphFormatError", "InterventionError", "JobCancelled", "JobError",
    "JobTimeoutError", "LanguageModel", "Model", "ModulePathError", "Node", "OrderError", "Proxy",
    "RateLimitError", "Ref", "RemoteError", "RemoteJob", "RemoteModel", "RemoteValidationError",
    "ResultVerificationError", "SandboxError", "TraceError", "Tracer", "ValueNotReadyError", "apply",
    "json_roundtrip",
]

__getattr__, __dir__ = lazy_exports(__name__, globals(), _WHERE)
