"""sandbox_server.metrics: /metrics reads job and worker state from the database at scrape time."""
from __future__ import annotations

import time
from pathlib import Path

from flask import Flask
from prometheus_client.parser import text_string_to_metric_families

from sandbox_server.app import create_app
from sandbox_server.types import JobError, JobRecord, JobStatus

from .conftest import make_config, services


def scrape(app: Flask) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    r = app.test_client().get("/metrics")
    assert r.status_code == 200
    assert r.headers["Content-Type"] == "text/plain; version=0.0.4; charset=utf-8"
    return {(s.name, tuple(sorted(s.labels.items()))): s.value
            for family in text_string_to_metric_families(r.get_data(as_text=True)) for s in family.samples}


def job(job_id: str, model: str, created: float) -> JobRecord:
    return JobRecord(id=job_id, key_id="k", model=model, kind="trace", status=JobStatus.QUEUED, created=created)


def test_metrics_count_jobs_workers_and_durations(tmp_path: Path) -> None:
    app = create_app(make_config(tmp_path))
    db = services(app).db
    now = time.time()
    for i in range(5):
        db.insert_job(job(f"j{i}", "tiny-gpt2", now + i), "{}")
    db.insert_job(job("s0", "sleepy", now), "{}")
    db.claim_next("tiny-gpt2", worker_pid=1, now=now)                       # j0 RUNNING
    for job_id, seconds in (("j1", 0.5), ("j2", 1.5)):
        claimed = db.claim_next("tiny-gpt2", worker_pid=1, now=now)
        assert claimed is not None and claimed.id == job_id
        db.finish_job(job_id, JobStatus.COMPLETED, now=now + seconds)
    db.request_cancel("j3")
    db.set_worker("tiny-gpt2", pid=10, state="ready", restarts=3)
    db.set_worker("sleepy", pid=None, state="down")

    m = scrape(app)
    assert m[("sandbox_jobs", (("model", "tiny-gpt2"), ("status", "QUEUED")))] == 1       # j4
    assert m[("sandbox_jobs", (("model", "tiny-gpt2"), ("status", "RUNNING")))] == 1       # j0
    assert m[("sandbox_jobs", (("model", "tiny-gpt2"), ("status", "COMPLETED")))] == 2
    assert m[("sandbox_jobs", (("model", "tiny-gpt2"), ("status", "CANCELLED")))] == 1
    assert m[("sandbox_jobs", (("model", "tiny-gpt2"), ("status", "ERROR")))] == 0
    assert m[("sandbox_queue_depth", (("model", "sleepy"),))] == 1
    assert m[("sandbox_queue_depth", (("model", "tiny-gpt2"),))] == 1
    assert m[("sandbox_worker_state", (("model", "tiny-gpt2"), ("state", "ready")))] == 1
    assert m[("sandbox_worker_state", (("model", "tiny-gpt2"), ("state", "down")))] == 0
    assert m[("sandbox_worker_state", (("model", "sleepy"), ("state", "down")))] == 1
    assert m[("sandbox_worker_restarts_total", (("model", "tiny-gpt2"),))] == 3
    assert 0 <= m[("sandbox_worker_heartbeat_age_seconds", (("model", "tiny-gpt2"),))] < 60
    assert m[("sandbox_recent_jobs", (("model", "tiny-gpt2"),))] == 2
    assert m[("sandbox_recent_job_seconds", (("model", "tiny-gpt2"), ("quantile", "1.0")))] == 1.5
    assert m[("sandbox_recent_job_seconds", (("model", "tiny-gpt2"), ("quantile", "0.5")))] == 1.5
    assert ("sandbox_recent_job_seconds", (("model", "sleepy"), ("quantile", "0.5"))) not in m

    db.finish_job("j4", JobStatus.ERROR, error=JobError("x", ""))
    m = scrape(app)                                     # read again at each scrape, nothing cached
    assert m[("sandbox_jobs", (("model", "tiny-gpt2"), ("status", "ERROR")))] == 1
    assert m[("sandbox_queue_depth", (("model", "tiny-gpt2"),))] == 0


def test_metrics_of_an_empty_server(tmp_path: Path) -> None:
    m = scrape(create_app(make_config(tmp_path)))
    assert m[("sandbox_queue_depth", (("model", "tiny-gpt2"),))] == 0
    assert m[("sandbox_worker_state", (("model", "tiny-gpt2"), ("state", "loading")))] == 0   # no worker yet
    assert m[("sandbox_recent_jobs", (("model", "sleepy"),))] == 0
