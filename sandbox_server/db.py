"""The server's state in one SQLite file (WAL): API keys (hashed), jobs and model workers.

    db = Database(config.db_path)
    db.insert_job(job, request_text)
    job = db.claim_next("tiny-gpt2", worker_pid=os.getpid())     # oldest fair QUEUED job -> RUNNING
    db.finish_job(job.id, JobStatus.COMPLETED, result=info)

Shared by every gunicorn web worker, the supervisor and the model workers (separate processes):
each thread gets its own connection; state changes that must not race (claiming a job, checking a
rate limit and inserting) run inside ``BEGIN IMMEDIATE`` transactions.
"""
from __future__ import annotations

import json
import sqlite3
import threading
import time
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from .types import JobEnd, JobError, JobRecord, JobStatus, KeyRecord, ResultInfo, WorkerRecord

_SCHEMA = """
CREATE TABLE IF NOT EXISTS keys (
    id TEXT PRIMARY KEY, name TEXT NOT NULL, secret_hash TEXT NOT NULL, models TEXT,
    rate_per_minute INTEGER, daily_jobs INTEGER, created REAL NOT NULL, revoked REAL
);
CREATE TABLE IF NOT EXISTS jobs (
    id TEXT PRIMARY KEY, key_id TEXT NOT NULL, model TEXT NOT NULL, kind TEXT NOT NULL, status TEXT NOT NULL,
    created REAL NOT NULL, started REAL, finished REAL, rows INTEGER NOT NULL DEFAULT 0, request BLOB,
    error TEXT, result_key TEXT, sha256 TEXT, signature TEXT, size INTEGER, expires REAL,
    result_expired INTEGER NOT NULL DEFAULT 0, cancel_requested INTEGER NOT NULL DEFAULT 0, worker_pid INTEGER
);
CREATE INDEX IF NOT EXISTS jobs_queue ON jobs (model, status, created);
CREATE INDEX IF NOT EXISTS jobs_key ON jobs (key_id, created);
CREATE INDEX IF NOT EXISTS jobs_served ON jobs (model, key_id, started);
CREATE TABLE IF NOT EXISTS workers (
    model TEXT PRIMARY KEY, pid INTEGER, state TEXT NOT NULL, heartbeat REAL NOT NULL, started REAL NOT NULL,
    restarts INTEGER NOT NULL DEFAULT 0, current_job TEXT
);
"""
CANCELLED_QUEUED = JobError("cancelled", "cancelled by its owner before it ran")
_JOB_COLUMNS = ("id, key_id, model, kind, status, created, started, finished, rows, error, result_key, sha256, "
                "signature, size, expires, result_expired, cancel_requested, worker_pid")


class Database:
    """Typed access to the server's SQLite file; safe to share across threads and processes."""

    def __init__(self, path: Path) -> None:
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._local = threading.local()
        self._con().executescript(_SCHEMA)   # idempotent; executescript manages its own transaction

    # ----- connections -----------------------------------------------------------------------
    def _con(self) -> sqlite3.Connection:
        con: sqlite3.Connection | None = getattr(self._local, "con", None)
        if con is None:
            con = sqlite3.connect(self.path, timeout=30.0, isolation_level=None, check_same_thread=False)
            con.execute("PRAGMA journal_mode=WAL")
            con.execute("PRAGMA synchronous=NORMAL")
            con.execute("PRAGMA busy_timeout=30000")
            self._local.con = con
        return con

    @contextmanager
    def _tx(self) -> Iterator[sqlite3.Connection]:
        """One write transaction, taken with the write lock up front (no upgrade deadlocks)."""
        con = self._con()
        con.execute("BEGIN IMMEDIATE")
        try:
            yield con
        except BaseException:
            con.execute("ROLLBACK")
            raise
        con.execute("COMMIT")

    def close(self) -> None:
        con = getattr(self._local, "con", None)
        if con is not None:
            con.close()
            self._local.con = None

    # ----- keys ------------------------------------------------------------------------------
    def insert_key(self, key: KeyRecord) -> None:
        with self._tx() as con:
            con.execute("INSERT INTO keys VALUES (?, ?, ?, ?, ?, ?, ?, ?)",
                        (key.id, key.name, key.secret_hash, json.dumps(list(key.models)) if key.models else None,
                         key.rate_per_minute, key.daily_jobs, key.created, key.revoked))

    def get_key(self, key_id: str) -> KeyRecord | None:
        row = self._con().execute("SELECT * FROM keys WHERE id = ?", (key_id,)).fetchone()
        return _key(row) if row else None

    def list_keys(self) -> list[KeyRecord]:
        return [_key(r) for r in self._con().execute("SELECT * FROM keys ORDER BY created")]

    def revoke_key(self, key_id: str, now: float | None = None) -> bool:
        """Mark a key revoked (by id or by name); False when no such active key."""
        with self._tx() as con:
            cur = con.execute("UPDATE keys SET revoked = ? WHERE (id = ? OR name = ?) AND revoked IS NULL",
                              (now or time.time(), key_id, key_id))
            return cur.rowcount > 0

    # ----- jobs: submission and rate limits --------------------------------------------------
    def insert_job(self, job: JobRecord, request: bytes | str) -> None:
        with self._tx() as con:
            _insert_job(con, job, request)

    def insert_job_limited(self, job: JobRecord, request: bytes | str, rate_per_minute: int | None,
                           daily_jobs: int | None, now: float) -> float | None:
        """Insert unless the key is over its rate (jobs in the last 60 s) or daily quota (since UTC midnight).

        Returns None when inserted, else the seconds until a retry can succeed. The check and the insert
        are one transaction, so concurrent web workers cannot both slip past the limit.
        """
        with self._tx() as con:
            if rate_per_minute:
                recent = con.execute("SELECT created FROM jobs WHERE key_id = ? AND created > ? ORDER BY created",
                                     (job.key_id, now - 60.0)).fetchall()
                if len(recent) >= rate_per_minute:
                    return max(recent[len(recent) - rate_per_minute][0] + 60.0 - now, 0.001)
            if daily_jobs:
                midnight = now - now % 86400.0
                (count,) = con.execute("SELECT COUNT(*) FROM jobs WHERE key_id = ? AND created >= ?",
                                       (job.key_id, midnight)).fetchone()
                if count >= daily_jobs:
                    return midnight + 86400.0 - now
            _insert_job(con, job, request)
        return None

    def get_job(self, job_id: str) -> JobRecord | None:
        row = self._con().execute(f"SELECT {_JOB_COLUMNS} FROM jobs WHERE id = ?", (job_id,)).fetchone()
        return _job(row) if row else None

    def job_request(self, job_id: str) -> bytes:
        row = self._con().execute("SELECT request FROM jobs WHERE id = ?", (job_id,)).fetchone()
        if row is None or row[0] is None:
            raise KeyError(job_id)
        data = row[0]
        return data if isinstance(data, bytes) else str(data).encode()

    def queue_position(self, job: JobRecord) -> int | None:
        """How many QUEUED jobs of the same model run before this one (0 = next), in claim order."""
        if job.status != JobStatus.QUEUED:
            return None
        order = self._queued(job.model)
        return order.index(job.id) if job.id in order else None

    def _queued(self, model: str) -> list[str]:
        """QUEUED job ids of ``model`` in the order workers claim them (fair across keys: round robin over
        keys, each key's jobs oldest first). The round starts with the key served least recently (its
        latest job start), so that successive one-job claims also alternate: a key with 50 queued jobs
        does not go first again and again while another waits."""
        con = self._con()
        rows = con.execute("SELECT id, key_id FROM jobs WHERE model = ? AND status = ? ORDER BY created",
                           (model, JobStatus.QUEUED)).fetchall()
        per_key: dict[str, list[str]] = {}
        for job_id, key_id in rows:
            per_key.setdefault(key_id, []).append(job_id)
        if len(per_key) > 1:        # one index lookup per waiting key, however long the job history
            served = {key: con.execute("SELECT MAX(started) FROM jobs WHERE model = ? AND key_id = ?",
                                       (model, key)).fetchone()[0] for key in per_key}
            first = {k: i for i, k in enumerate(per_key)}
            per_key = dict(sorted(per_key.items(), key=lambda kv: (served.get(kv[0]) or 0.0, first[kv[0]])))
        order: list[str] = []
        queues = list(per_key.values())
        depth = 0
        while len(order) < len(rows):
            order.extend(q[depth] for q in queues if depth < len(q))
            depth += 1
        return order

    # ----- jobs: workers ---------------------------------------------------------------------
    def claim_next(self, model: str, worker_pid: int, now: float | None = None) -> JobRecord | None:
        """Take the next QUEUED job of ``model`` (fair order) and mark it RUNNING; None when the queue is empty."""
        jobs = self.claim_batch(model, worker_pid, 1, now)
        return jobs[0] if jobs else None

    def claim_batch(self, model: str, worker_pid: int, limit: int, now: float | None = None) -> list[JobRecord]:
        """Take up to ``limit`` QUEUED jobs of ``model`` in fair order and mark them RUNNING (co-batching)."""
        with self._tx() as con:
            order = self._queued(model)[:limit]
            for job_id in order:
                con.execute("UPDATE jobs SET status = ?, started = ?, worker_pid = ? WHERE id = ?",
                            (JobStatus.RUNNING, now or time.time(), worker_pid, job_id))
        return [j for j in (self.get_job(i) for i in order) if j is not None]

    def restart_clock(self, job_ids: list[str], now: float | None = None) -> None:
        """Set ``started`` of RUNNING jobs to now: a co-batched job run again alone gets its full time limit
        (the supervisor measures a job's run time from ``started``)."""
        with self._tx() as con:
            for job_id in job_ids:
                con.execute("UPDATE jobs SET started = ? WHERE id = ? AND status = ?",
                            (now or time.time(), job_id, JobStatus.RUNNING))

    def finish_job(self, job_id: str, status: JobStatus, *, error: JobError | None = None,
                   result: ResultInfo | None = None, now: float | None = None) -> bool:
        """End a RUNNING (or QUEUED) job; False if it had already ended (e.g. cancelled meanwhile)."""
        return bool(self.finish_jobs([JobEnd(job_id, status, error, result)], now))

    def finish_jobs(self, ends: Sequence[JobEnd], now: float | None = None) -> list[str]:
        """End several jobs in one transaction (a co-batch); the ids that were still RUNNING or QUEUED."""
        finished = now or time.time()
        ended: list[str] = []
        with self._tx() as con:
            for end in ends:
                result = end.result
                cur = con.execute(
                    "UPDATE jobs SET status = ?, finished = ?, error = ?, result_key = ?, sha256 = ?, signature = ?, "
                    "size = ?, expires = ?, request = NULL WHERE id = ? AND status IN (?, ?)",
                    (end.status, finished, json.dumps(end.error.to_dict()) if end.error else None,
                     result.key if result else None, result.sha256 if result else None,
                     result.signature if result else None, result.size if result else None,
                     result.expires if result else None, end.job_id, JobStatus.QUEUED, JobStatus.RUNNING))
                if cur.rowcount > 0:
                    ended.append(end.job_id)
        return ended

    def request_cancel(self, job_id: str, now: float | None = None) -> JobRecord | None:
        """QUEUED -> CANCELLED at once; RUNNING -> cancel_requested (the worker stops it). Returns the job."""
        with self._tx() as con:
            con.execute("UPDATE jobs SET status = ?, finished = ?, request = NULL, "
                        "error = ? WHERE id = ? AND status = ?",
                        (JobStatus.CANCELLED, now or time.time(), json.dumps(CANCELLED_QUEUED.to_dict()),
                         job_id, JobStatus.QUEUED))
            con.execute("UPDATE jobs SET cancel_requested = 1 WHERE id = ? AND status = ?",
                        (job_id, JobStatus.RUNNING))
        return self.get_job(job_id)

    def cancels_requested(self, job_ids: Sequence[str]) -> list[str]:
        """Which of ``job_ids`` their owners asked to cancel: one query for a whole co-batch."""
        if not job_ids:
            return []
        marks = ", ".join("?" * len(job_ids))
        rows = self._con().execute(f"SELECT id FROM jobs WHERE cancel_requested = 1 AND id IN ({marks})",
                                   tuple(job_ids)).fetchall()
        found = {row[0] for row in rows}
        return [job_id for job_id in job_ids if job_id in found]

    def fail_running(self, model: str | None, error: JobError, pid: int | None = None) -> list[str]:
        """End every RUNNING job (of ``model``, of worker ``pid``) as ERROR: used when a worker dies."""
        query = "SELECT id FROM jobs WHERE status = ?"
        args: list[Any] = [JobStatus.RUNNING]
        if model is not None:
            query += " AND model = ?"
            args.append(model)
        if pid is not None:
            query += " AND worker_pid = ?"
            args.append(pid)
        ids = [r[0] for r in self._con().execute(query, args)]
        return [i for i in ids if self.finish_job(i, JobStatus.ERROR, error=error)]

    def running_jobs(self) -> list[JobRecord]:
        rows = self._con().execute(f"SELECT {_JOB_COLUMNS} FROM jobs WHERE status = ?", (JobStatus.RUNNING,))
        return [_job(r) for r in rows]

    # ----- results ---------------------------------------------------------------------------
    def expired_results(self, now: float) -> list[tuple[str, str]]:
        rows = self._con().execute("SELECT id, result_key FROM jobs WHERE result_key IS NOT NULL AND expires < ?",
                                   (now,))
        return [(r[0], r[1]) for r in rows]

    def mark_expired(self, job_id: str) -> None:
        with self._tx() as con:
            con.execute("UPDATE jobs SET result_key = NULL, result_expired = 1 WHERE id = ?", (job_id,))

    # ----- metrics ---------------------------------------------------------------------------
    def status_counts(self) -> dict[tuple[str, str], int]:
        rows = self._con().execute("SELECT model, status, COUNT(*) FROM jobs GROUP BY model, status")
        return {(r[0], r[1]): r[2] for r in rows}

    def finished_durations(self, since: float) -> list[tuple[str, float]]:
        rows = self._con().execute("SELECT model, finished - started FROM jobs WHERE finished > ? AND "
                                   "started IS NOT NULL AND status = ?", (since, JobStatus.COMPLETED))
        return [(r[0], float(r[1])) for r in rows]

    # ----- workers ---------------------------------------------------------------------------
    def set_worker(self, model: str, pid: int | None, state: str, restarts: int | None = None,
                   current_job: str | None = None, now: float | None = None) -> None:
        now = now or time.time()
        with self._tx() as con:
            row = con.execute("SELECT started, restarts FROM workers WHERE model = ?", (model,)).fetchone()
            started = now if row is None or state == "loading" else row[0]
            count = restarts if restarts is not None else (row[1] if row else 0)
            con.execute("INSERT OR REPLACE INTO workers VALUES (?, ?, ?, ?, ?, ?, ?)",
                        (model, pid, state, now, started, count, current_job))

    def heartbeat(self, model: str, current_job: str | None, now: float | None = None) -> None:
        with self._tx() as con:
            con.execute("UPDATE workers SET heartbeat = ?, current_job = ? WHERE model = ?",
                        (now or time.time(), current_job, model))

    def workers(self) -> list[WorkerRecord]:
        rows = self._con().execute("SELECT model, pid, state, heartbeat, started, restarts, current_job FROM workers")
        return [WorkerRecord(*r) for r in rows]


def _insert_job(con: sqlite3.Connection, job: JobRecord, request: bytes | str) -> None:
    con.execute("INSERT INTO jobs (id, key_id, model, kind, status, created, rows, request) VALUES (?,?,?,?,?,?,?,?)",
                (job.id, job.key_id, job.model, job.kind, job.status, job.created, job.rows,
                 request if isinstance(request, bytes) else request.encode()))


def _key(row: tuple[Any, ...]) -> KeyRecord:
    models = tuple(json.loads(row[3])) if row[3] else None
    return KeyRecord(id=row[0], name=row[1], secret_hash=row[2], models=models, rate_per_minute=row[4],
                     daily_jobs=row[5], created=row[6], revoked=row[7])


def _job(row: tuple[Any, ...]) -> JobRecord:
    (job_id, key_id, model, kind, status, created, started, finished, rows, error, result_key, sha256,
     signature, size, expires, result_expired, cancel_requested, worker_pid) = row
    result = ResultInfo(key=result_key, sha256=sha256, signature=signature, size=size, expires=expires) \
        if result_key else None
    return JobRecord(id=job_id, key_id=key_id, model=model, kind=kind, status=JobStatus(status), created=created,
                     started=started, finished=finished, rows=rows,
                     error=JobError.from_dict(json.loads(error)) if error else None,
                     result=result, result_expired=bool(result_expired), cancel_requested=bool(cancel_requested),
                     worker_pid=worker_pid)
