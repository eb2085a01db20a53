"""The server's vocabulary: job states, stored keys and jobs, and where a result lives.

    job = JobRecord(id="j_...", key_id="k1", model="tiny-gpt2", kind="trace", status=JobStatus.QUEUED, created=t)
    job.terminal            # False until COMPLETED / ERROR / CANCELLED
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any


class JobStatus:
    """A job's life: RECEIVED -> QUEUED -> RUNNING -> COMPLETED | ERROR | CANCELLED."""

    RECEIVED = "RECEIVED"
    QUEUED = "QUEUED"
    RUNNING = "RUNNING"
    COMPLETED = "COMPLETED"
    ERROR = "ERROR"
    CANCELLED = "CANCELLED"
    TERMINAL = frozenset({COMPLETED, ERROR, CANCELLED})
    ALL = (RECEIVED, QUEUED, RUNNING, COMPLETED, ERROR, CANCELLED)


@dataclass(frozen=True)
class KeyRecord:
    """An API key as stored: only the secret's SHA-256, never the secret itself."""

    id: str
    name: str
    secret_hash: str
    models: tuple[str, ...] | None = None       # None: every model
    rate_per_minute: int | None = None          # None: no rate limit
    daily_jobs: int | None = None               # None: no daily quota
    created: float = 0.0
    revoked: float | None = None

    def may_use(self, model: str) -> bool:
        return self.models is None or model in self.models


@dataclass(frozen=True)
class ResultInfo:
    """Where a finished job's signed bundle is and how to check it."""

    key: str            # the store key (unguessable)
    sha256: str
    signature: str      # base64 Ed25519 over storage.result_message(job id, sha256)
    size: int
    expires: float


@dataclass(frozen=True)
class JobEnd:
    """How a job ended, as its worker records it: the status and the error or the stored result."""

    job_id: str
    status: str
    error: dict[str, Any] | None = None
    result: ResultInfo | None = None


@dataclass(frozen=True)
class JobRecord:
    """One job row. ``error`` is {"code", "message", "node", "source"} when it ended ERROR."""

    id: str
    key_id: str
    model: str
    kind: str
    status: str
    created: float
    started: float | None = None
    finished: float | None = None
    rows: int = 0
    error: dict[str, Any] | None = None
    result: ResultInfo | None = None
    result_expired: bool = False
    cancel_requested: bool = False
    worker_pid: int | None = None
    extra: dict[str, Any] = field(default_factory=dict)

    @property
    def terminal(self) -> bool:
        return self.status in JobStatus.TERMINAL


@dataclass(frozen=True)
class WorkerRecord:
    """A model worker process as the supervisor last reported it."""

    model: str
    pid: int | None
    state: str          # "loading" | "ready" | "down"
    heartbeat: float
    started: float
    restarts: int = 0
    current_job: str | None = None
