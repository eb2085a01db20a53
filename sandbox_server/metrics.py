"""Prometheus metrics read from the database at scrape time (``GET /metrics``).

    registry = metrics_registry(config, db)
    text = render(registry)            # Prometheus text format 0.0.4

Reading the shared SQLite file at scrape time, instead of counting in each process, gives the same
answer whichever gunicorn worker serves the scrape, and survives restarts:

    sandbox_jobs{model,status}                    jobs in the database by state (gauge)
    sandbox_queue_depth{model}                    QUEUED jobs
    sandbox_worker_state{model,state}             1 for the worker's reported state (loading/ready/down)
    sandbox_worker_restarts_total{model}          restarts of the model's worker process
    sandbox_worker_heartbeat_age_seconds{model}   seconds since the worker last reported
    sandbox_recent_job_seconds{model,quantile}    run time of jobs COMPLETED in the last 5 minutes
    sandbox_recent_jobs{model}                    how many such jobs
"""
from __future__ import annotations

import time
from collections.abc import Iterator

from prometheus_client import CollectorRegistry
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.exposition import generate_latest

from .config import ServerConfig
from .db import Database
from .types import JobStatus

CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"
RECENT_S = 300.0
QUANTILES = (0.5, 0.9, 0.99, 1.0)
WORKER_STATES = ("loading", "ready", "down")


class DatabaseCollector:
    """A custom collector: every scrape reads job and worker state from ``db``."""

    def __init__(self, config: ServerConfig, db: Database) -> None:
        self.config = config
        self.db = db

    def collect(self) -> Iterator[Metric]:
        models = [m.name for m in self.config.models]
        yield from self._jobs(models)
        yield from self._workers(models)
        yield from self._durations(models)

    def _jobs(self, models: list[str]) -> Iterator[Metric]:
        counts = self.db.status_counts()
        known = list(dict.fromkeys(models + [m for m, _ in counts]))
        jobs = GaugeMetricFamily("sandbox_jobs", "Jobs in the database by model and status", labels=["model", "status"])
        depth = GaugeMetricFamily("sandbox_queue_depth", "QUEUED jobs per model", labels=["model"])
        for model in known:
            for status in JobStatus:
                jobs.add_metric([model, status], counts.get((model, status), 0))
            depth.add_metric([model], counts.get((model, JobStatus.QUEUED), 0))
        yield jobs
        yield depth

    def _workers(self, models: list[str]) -> Iterator[Metric]:
        now = time.time()
        state = GaugeMetricFamily("sandbox_worker_state", "1 for the model worker's current state",
                                  labels=["model", "state"])
        restarts = CounterMetricFamily("sandbox_worker_restarts", "Restarts of the model's worker process",
                                       labels=["model"])
        age = GaugeMetricFamily("sandbox_worker_heartbeat_age_seconds", "Seconds since the worker last reported",
                                labels=["model"])
        workers = {w.model: w for w in self.db.workers()}
        for model in dict.fromkeys(models + list(workers)):
            worker = workers.get(model)
            current = worker.state if worker is not None else None   # no worker registered: every state 0
            for s in WORKER_STATES:
                state.add_metric([model, s], 1.0 if s == current else 0.0)
            restarts.add_metric([model], worker.restarts if worker is not None else 0)
            if worker is not None:
                age.add_metric([model], max(now - worker.heartbeat, 0.0))
        yield state
        yield restarts
        yield age

    def _durations(self, models: list[str]) -> Iterator[Metric]:
        per_model: dict[str, list[float]] = {m: [] for m in models}
        for model, seconds in self.db.finished_durations(time.time() - RECENT_S):
            per_model.setdefault(model, []).append(seconds)
        quantiles = GaugeMetricFamily("sandbox_recent_job_seconds", "Run time of jobs completed in the last "
                                      f"{RECENT_S:.0f} s", labels=["model", "quantile"])
        count = GaugeMetricFamily("sandbox_recent_jobs", f"Jobs completed in the last {RECENT_S:.0f} s",
                                  labels=["model"])
        for model, values in per_model.items():
            values.sort()
            count.add_metric([model], len(values))
            for q in QUANTILES:
                if values:
                    quantiles.add_metric([model, str(q)], values[min(len(values) - 1, int(q * len(values)))])
        yield quantiles
        yield count


def metrics_registry(config: ServerConfig, db: Database) -> CollectorRegistry:
    registry = CollectorRegistry(auto_describe=False)
    registry.register(DatabaseCollector(config, db))
    return registry


def render(registry: CollectorRegistry) -> bytes:
    return generate_latest(registry)
