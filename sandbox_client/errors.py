"""Typed errors. Each has a stable ``code`` and a message that says what to do.

    try:
        with lm.trace("hi"):
            lm.model.layrs
    except ModulePathError as err:
        print(err.code, err)    # module_path: no module 'model.layrs'; did you mean 'model.layers'?
"""
from __future__ import annotations

from typing import Any


class SandboxError(Exception):
    """Base of every error this package raises on purpose."""

    code = "sandbox_error"
    node_id: int | None = None   # the graph node that failed, when an executor knows it (co-batching blames by it)

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


class RemoteError(SandboxError):
    """A remote run failed: ``code`` is the server's (or the client's) stable code, ``status`` the HTTP status.

        try:
            with remote.trace("hi"): ...
        except RemoteError as err:
            print(err.code, err.status, err.message, err.source)
    """

    code = "remote"

    def __init__(self, code: str, message: str, *, status: int | None = None, source: str = "",
                 node: int | None = None) -> None:
        super().__init__(message, source=source)
        self.code = code
        self.status = status
        self.node = node


class AuthError(RemoteError):
    """The server refused the API key (401: missing, malformed or unknown; 403: revoked or model not allowed)."""


class RateLimitError(RemoteError):
    """Too many requests or jobs for this key (429); try again after ``retry_after`` seconds."""

    def __init__(self, code: str, message: str, *, status: int | None = 429, source: str = "",
                 node: int | None = None, retry_after: float | None = None) -> None:
        super().__init__(code, message, status=status, source=source, node=node)
        self.retry_after = retry_after


class RemoteValidationError(RemoteError):
    """The server's validator refused the graph (400/413); ``source`` is the user's line at fault."""


class JobError(RemoteError):
    """The job ran on the server and failed; ``node``/``source`` point at the intervention at fault."""


class JobCancelled(RemoteError):
    """The job was cancelled (``job.cancel()``) before it finished, so there are no results."""


class JobTimeoutError(RemoteError, TimeoutError):
    """``job.wait(timeout=...)`` passed its timeout; the job goes on (wait again, or cancel it)."""


class ResultVerificationError(RemoteError):
    """The downloaded result failed verification (sha256, signature or the server's pinned key); nothing is loaded."""


# Server codes that mean what a local error class means: a remote error with one of these codes is
# also an instance of that class, so `except sc.InterventionError` works the same locally and remotely.
LOCAL_CLASSES: dict[str, type[SandboxError]] = {
    "intervention": InterventionError, "shape": InterventionError, "module_path": ModulePathError,
    "order": OrderError, "skip_nested": TraceError, "trace": TraceError,
}


def remote_error(cls: type[RemoteError], code: str, message: str, **kwargs: Any) -> RemoteError:
    """``cls(code, message, ...)``, made also an instance of the local error class for ``code`` (if any).

        err = remote_error(JobError, "intervention", "index 7 is out of bounds", source="x[:, 7]  # t.py:4")
        isinstance(err, JobError) and isinstance(err, InterventionError)    # True
    """
    local = LOCAL_CLASSES.get(code)
    kind = cls if local is None or issubclass(cls, local) else _combined(cls, local)
    return kind(code, message, **kwargs)


_COMBINED: dict[tuple[type, type], type[RemoteError]] = {}


def _combined(cls: type[RemoteError], local: type[SandboxError]) -> type[RemoteError]:
    kind = _COMBINED.get((cls, local))
    if kind is None:   # one class per pair, so that repeated errors have the same type
        kind = _COMBINED[(cls, local)] = type(cls.__name__, (cls, local), {"__module__": __name__,
                                                                          "__doc__": cls.__doc__})
    return kind
