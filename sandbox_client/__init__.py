"""interp-sandbox client: trace interventions on a model's internals as a restricted graph.

    import sandbox_client as sc
    lm = sc.LanguageModel(hf_model, tokenizer=tok)
    with lm.trace("The Eiffel Tower is in the city of"):
        logits = lm.output.logits.save()
    logits.value

The graph (``tracer.graph``) is plain JSON (``to_json``/``Graph.from_json``); the same graph
runs locally (here) or on a server (``sc.RemoteModel("name", host=..., api_key=...)``).
"""
from .apply import apply
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

__all__ = [
    "AuthError", "Envoy", "Graph", "apply", "GraphFormatError", "InterventionError", "JobCancelled", "JobError",
    "JobTimeoutError", "LanguageModel", "Model", "ModulePathError", "Node", "OrderError", "Proxy", "RateLimitError",
    "Ref", "RemoteError", "RemoteJob", "RemoteModel", "RemoteValidationError", "ResultVerificationError",
    "SandboxError", "TraceError", "Tracer", "ValueNotReadyError", "json_roundtrip",
]
