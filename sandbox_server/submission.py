"""Jobs as the API sees them: submitting one, following it, cancelling it, fetching its result.

    job = submit(config, db, catalog, key, request_body)     # JobRecord (QUEUED), or ApiError 4xx/5xx
    job = wait_for_job(db, job, 5.0, ends)                  # returns early once the job is terminal
    job_view(job, db, store, config)                         # the Job dict of docs/api.md
    job_view(job, db, store, config, inline=True)            # ... with a small result's bytes inside (base64)

The order of checks in ``submit``: the request's envelope ({"model", "graph"}), the model (exists,
this key may use it, its worker is up), the graph (every validator rule, then a dry run with the
real token count), then the key's rate limit and daily quota together with the insert in one
transaction. Last, the model's worker is woken with one datagram on its Unix socket.
"""
from __future__ import annotations

import base64
import json
import math
import secrets
import time
from typing import Any

from storage.types import ResultMissing, ResultStore, StorageError
from validator import ValidatedGraph, ValidationError

from .catalog import Catalog, ModelNotReady, model_status
from .config import ServerConfig
from .db import Database
from .errors import ApiError
from .jobends import JobEnds, announce
from .modelinfo import ModelInfo
from .types import JobRecord, JobStatus, KeyRecord
from .wake import send_wake

RETRY_UNAVAILABLE_S = 5


def submit(config: ServerConfig, db: Database, catalog: Catalog, key: KeyRecord, body: bytes) -> JobRecord:
    """Check and queue one job for ``key`` from the raw request ``body``; wakes the model's worker."""
    model, graph_text = parse_job_request(body)
    check_model_access(config, key, model)
    require_available(db, catalog, model)
    checked = _validated(catalog, model, graph_text)
    now = time.time()
    job = JobRecord(id="job_" + secrets.token_urlsafe(18), key_id=key.id, model=model, kind=checked.graph.kind,
                    status=JobStatus.QUEUED, created=now, rows=checked.rows)
    retry = db.insert_job_limited(job, graph_text, key.rate_per_minute, key.daily_jobs, now)
    if retry is not None:
        raise _limit_error(key, retry)
    send_wake(config.wake_socket(model))   # the worker also polls: a lost datagram only costs latency
    return job


def parse_job_request(body: bytes) -> tuple[str, bytes]:
    """``{"model": str, "graph": str}`` -> (model, the graph's UTF-8 text); ApiError 400 otherwise."""
    try:
        data = json.loads(body)
    except (ValueError, RecursionError):
        raise ApiError(400, "invalid_json", 'the body must be JSON: {"model": "<name>", "graph": "<Graph JSON '
                       'text>"}') from None
    if not isinstance(data, dict):
        raise ApiError(400, "bad_request", 'the body must be a JSON object {"model": ..., "graph": ...}')
    unknown = sorted(set(data) - {"model", "graph"})
    if unknown:
        raise ApiError(400, "bad_request", f"unknown field(s) {', '.join(map(repr, unknown))}; a job is "
                       '{"model": ..., "graph": ...}')
    model, graph = data.get("model"), data.get("graph")
    if not isinstance(model, str) or not model:
        raise ApiError(400, "bad_request", '"model" must be a model name (see GET /v1/models)')
    if not isinstance(graph, str):   # an empty string is the validator's to refuse ("format")
        raise ApiError(400, "bad_request", '"graph" must be the graph\'s JSON text (Graph.to_json()), as a string')
    try:
        return model, graph.encode("utf-8")
    except UnicodeEncodeError:   # a lone surrogate escape (\ud800) in the body: not text
        raise ApiError(400, "bad_request", '"graph" holds an unpaired surrogate escape (\\udXXX); send valid '
                       "Unicode text") from None


def check_model_access(config: ServerConfig, key: KeyRecord, model: str) -> None:
    """404 ``model_not_found`` for a model this server does not serve, 403 ``model_forbidden`` for this key."""
    if config.model(model) is None:
        names = ", ".join(m.name for m in config.models if key.may_use(m.name)) or "none"
        raise ApiError(404, "model_not_found", f"this server has no model {model!r}; models for your key: {names}")
    if not key.may_use(model):
        raise ApiError(403, "model_forbidden", f"your API key may not use model {model!r}; ask the server's admin")


def require_available(db: Database, catalog: Catalog, model: str) -> ModelInfo:
    """The model's published info; 503 ``model_unavailable`` while its worker loads it or is down."""
    status = model_status(db, catalog, model)
    info = catalog.info(model) if status == "ready" else None
    if info is None:
        what = "is down (its worker is restarting)" if status == "down" else "is loading"
        raise ApiError(503, "model_unavailable", f"model {model} {what}; try again in a few seconds",
                       headers={"Retry-After": str(RETRY_UNAVAILABLE_S)})
    return info


def wait_for_job(db: Database, job: JobRecord, wait_s: float, ends: JobEnds) -> JobRecord:
    """``job`` as it is once terminal, or after ``wait_s`` seconds, whichever comes first: woken by the
    job's end announcement (``jobends``), with a database read only every ``SAFETY_POLL_S`` meanwhile."""
    current = job

    def still_running() -> bool:
        nonlocal current
        current = db.get_job(job.id) or current
        return not current.terminal

    if not job.terminal:
        ends.wait_for(job.id, wait_s, still_running)
        current = db.get_job(job.id) or current
    return current


def owned_job(db: Database, key: KeyRecord, job_id: str) -> JobRecord:
    """The job ``job_id`` if ``key`` submitted it; 404 ``job_not_found`` otherwise (also for other keys' jobs)."""
    job = db.get_job(job_id) if len(job_id) <= 64 else None
    if job is None or job.key_id != key.id:
        raise ApiError(404, "job_not_found", f"no job {job_id[:64]!r} for your API key; check the id")
    return job


def cancel_job(db: Database, job: JobRecord, config: ServerConfig) -> JobRecord:
    """QUEUED -> CANCELLED now; RUNNING -> cancel_requested (the worker stops it); 409 ``already_finished``."""
    if job.terminal:
        raise ApiError(409, "already_finished", f"job {job.id} already ended {job.status}; nothing to cancel")
    job = db.request_cancel(job.id) or job
    if job.terminal:
        announce(config.web_socket_dir, [job.id])
    return job


def result_bytes(job: JobRecord, store: ResultStore) -> bytes:
    """The stored bundle of a COMPLETED job; 409 ``not_ready`` / ``no_result``, 410 ``result_expired``."""
    if not job.terminal:
        raise ApiError(409, "not_ready", f"job {job.id} is {job.status}; wait until it is COMPLETED "
                       f"(GET /v1/jobs/{job.id}?wait=30)")
    if job.status != JobStatus.COMPLETED:
        raise ApiError(409, "no_result", f"job {job.id} ended {job.status}, so it has no result; see its error")
    if job.result is None or job.result_expired:
        raise _expired(job)
    try:
        return store.get(job.result.key)
    except ResultMissing:
        raise _expired(job) from None
    except StorageError as err:
        raise ApiError(503, "store_unavailable", f"the result store cannot be read right now ({err}); try again "
                       "later", headers={"Retry-After": str(RETRY_UNAVAILABLE_S)}) from None


def job_view(job: JobRecord, db: Database, store: ResultStore, config: ServerConfig,
             inline: bool = False) -> dict[str, Any]:
    """The API's Job object; with ``inline`` a result of at most ``[jobs] inline_result_bytes`` also carries
    its bytes (base64 ``data``), so the client needs no download request."""
    result: dict[str, Any] | None = None
    if job.result is not None and not job.result_expired:
        result = {"url": _result_url(job, store, config), "sha256": job.result.sha256,
                  "signature": job.result.signature, "size": job.result.size, "expires": job.result.expires}
        if inline and job.result.size <= config.jobs.inline_result_bytes:
            data = _inline_data(job, store)
            if data is not None:
                result["data"] = data
    return {"id": job.id, "model": job.model, "kind": job.kind, "status": job.status,
            "position": db.queue_position(job), "created": job.created, "started": job.started,
            "finished": job.finished, "cancel_requested": job.cancel_requested,
            "error": job.error.to_dict() if job.error is not None else None,
            "result": result, "result_expired": job.result_expired}


def _inline_data(job: JobRecord, store: ResultStore) -> str | None:
    """The stored bundle as base64; None when the store cannot give it now (the client then downloads ``url``
    and gets that request's own error)."""
    assert job.result is not None
    try:
        data = store.get(job.result.key)
    except (ResultMissing, StorageError):
        return None
    return base64.b64encode(data).decode("ascii")


def _validated(catalog: Catalog, model: str, graph_text: bytes) -> ValidatedGraph:
    try:
        return catalog.validate_job(model, graph_text)
    except ValidationError as err:
        status = 413 if err.code == "request_too_large" else 400
        raise ApiError(status, err.code, err.message, node=err.node, source=err.source) from None
    except ModelNotReady as err:
        raise ApiError(503, "model_unavailable", f"{err}; try again in a few seconds",
                       headers={"Retry-After": str(RETRY_UNAVAILABLE_S)}) from None
    except RecursionError:
        raise ApiError(400, "depth", "the graph is nested too deeply; flatten its values") from None


def _limit_error(key: KeyRecord, retry_s: float) -> ApiError:
    headers = {"Retry-After": str(max(1, math.ceil(retry_s)))}
    # The rate window is 60 s, so a longer wait can only be the daily quota. (In the last minute of a UTC
    # day a full quota also gives a wait under 60 s and is reported as the rate: the wait itself is right.)
    if key.rate_per_minute and (not key.daily_jobs or retry_s <= 60.0):
        return ApiError(429, "rate_limited", f"your key allows {key.rate_per_minute} jobs per minute; retry in "
                        f"{headers['Retry-After']} s", headers=headers)
    return ApiError(429, "quota_exceeded", f"your key allows {key.daily_jobs} jobs per day (UTC); retry in "
                    f"{headers['Retry-After']} s, after midnight UTC", headers=headers)


def _expired(job: JobRecord) -> ApiError:
    return ApiError(410, "result_expired", f"the result of job {job.id} has expired and was deleted; run the "
                    "trace again")


def _result_url(job: JobRecord, store: ResultStore, config: ServerConfig) -> str:
    assert job.result is not None
    try:
        url = store.url(job.result.key, config.store.url_expires_s)
    except StorageError:
        url = None
    return url or f"/v1/jobs/{job.id}/result"
