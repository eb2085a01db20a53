"""Typed errors. Each has a stable ``code`` and a message that says what to do.

    try:
        with lm.trace("hi"):
            lm.model.layrs
    except ModulePathError as err:
        print(err.code, err)    # module_path: no module 'model.layrs'; did you mean 'model.layers'?
"""
from __future__ import annotations


class SandboxError(Exception):
    """Base of every error this package raises on purpose."""

    code = "sandbox_error"

    def __init__(self, message: str, *, source: str = "") -> None:
        self.message = message
        self.source = source
        super().__init__(f"{message}\n  (at {source})" if source else message)


class TraceError(SandboxError):
    """The trace block used the API in a way that cannot be recorded."""

    code = "trace"


class ModulePathError(TraceError):
    """A module path does not exist in the model."""

    code = "module_path"


class OrderError(SandboxError):
    """The graph asks for a value before the model can have produced it."""

    code = "order"


class InterventionError(SandboxError):
    """A node failed while the model ran; ``source`` is the user's line that created it."""

    code = "intervention"


class ValueNotReadyError(SandboxError):
    """``.value`` was read before the trace block ended (or the trace failed)."""

    code = "value_not_ready"
