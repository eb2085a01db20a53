"""The server's vocabulary: job states, stored keys and jobs, and where a result lives.

    job = JobRecord(id="j_...", key_id="k1", model="tiny-gpt2", kind="trace", status=JobStatus.QUEUED, created=t)
    job.terminal            # False until COMPLETED / ERROR / CANCELLED
    job.error               # a JobError once it ended ERROR
"""
from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from enum import StrEnum
from typing import Any


class JobStatus(StrEnum):
    """A job's life: QUEUED -> RUNNING -> COMPLETED | ERROR | CANCELLED (QUEUED -> CANCELLED when cancelled
    before it ran). Members are strings: they compare equal to, and store and serialize as, their names.

        JobStatus("QUEUED") is JobStatus.QUEUED and JobStatus.QUEUED == "QUEUED"     # True
        JobStatus.ERROR.terminal                                                   # True
    """

    QUEUED = "QUEUED"
    RUNNING = "RUNNING"
    COMPLETED = "COMPLETED"
    ERROR = "ERROR"
    CANCELLED = "CANCELLED"

    @property
    def terminal(self) -> bool:
        """Whether the job has ended (COMPLETED, ERROR or CANCELLED): nothing changes it afterwards."""
        return self in _TERMINAL


_TERMINAL = frozenset({JobStatus.COMPLETED, JobStatus.ERROR, JobStatus.CANCELLED})


@dataclass(frozen=True)
class JobError:
    """Why a job ended ERROR (or CANCELLED): a stable ``code``, a ``message`` that says what to do, and the
    graph node (with the user's source line) at fault when one is. The Job object's ``error`` in the API.

        JobError("timeout", "the job ran longer than its limit of 60 s ...").to_dict()
        # {"code": "timeout", "message": "...", "node": None, "source": ""}
        JobError.from_dict(validation_error.to_dict())
    """

    code: str
    message: str
    node: int | None = None
    source: str = ""

    def to_dict(self) -> dict[str, Any]:
        """The JSON form, as the API answers it and the database stores it."""
        return {"code": self.code, "message": self.message, "node": self.node, "source": self.source}

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> JobError:
        """Read ``to_dict``'s form back (``node`` and ``source`` may be absent)."""
        return cls(code=str(data["code"]), message=str(data["message"]), node=data.get("node"),
                   source=str(data.get("source") or ""))


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
    status: JobStatus
    error: JobError | None = None
    result: ResultInfo | None = None


@dataclass(frozen=True)
class JobRecord:
    """One job row. ``error`` says why when it ended ERROR (or CANCELLED)."""

    id: str
    key_id: str
    model: str
    kind: str
    status: JobStatus
    created: float
    started: float | None = None
    finished: float | None = None
    rows: int = 0
    error: JobError | None = None
    result: ResultInfo | None = None
    result_expired: bool = False
    cancel_requested: bool = False
    worker_pid: int | None = None

    @property
    def terminal(self) -> bool:
        return JobStatus(self.status).terminal


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
