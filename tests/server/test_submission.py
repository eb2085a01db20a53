"""Submitting, following, cancelling and fetching jobs through the API (no worker: jobs stay QUEUED
unless a test ends them through the database as a worker would)."""
from __future__ import annotations

import json
import socket
import threading
import time
from pathlib import Path
from typing import Any

import pytest
import torch
from conftest import build_tiny
from flask import Flask
from flask.testing import FlaskClient

import sandbox_client as sc
from sandbox_server.app import create_app
from sandbox_server.types import JobError, JobStatus

from .conftest import IDS, Key, finish_with_result, make_config, new_key, services


def submit(client: FlaskClient, key: Key, graph: str, model: str = "tiny-gpt2") -> Any:
    return client.post("/v1/jobs", json={"model": model, "graph": graph}, headers=key.headers)


def error_of(response: Any) -> dict[str, Any]:
    body = response.get_json()
    assert set(body) == {"error"} and set(body["error"]) == {"code", "message", "node", "source"}, body
    return dict(body["error"])


# ----- accepted jobs -------------------------------------------------------------------------
def test_submit_queues_the_job_and_stores_the_graph(app: Flask, client: FlaskClient, key: Key,
                                                     logits_graph: str) -> None:
    r = submit(client, key, logits_graph)
    assert r.status_code == 202, r.get_json()
    job = r.get_json()
    assert r.headers["Location"] == f"/v1/jobs/{job['id']}"
    assert job["id"].startswith("job_") and len(job["id"]) == 4 + 24
    assert (job["model"], job["kind"], job["status"]) == ("tiny-gpt2", "trace", "QUEUED")
    assert isinstance(job["position"], int) and job["result"] is None and job["error"] is None
    db = services(app).db
    assert db.job_request(job["id"]).decode() == logits_graph      # what the worker validates and runs
    record = db.get_job(job["id"])
    assert record is not None and record.key_id == key.record.id and record.rows == 1


def test_generate_job_kind(client: FlaskClient, key: Key, local_lm: sc.LanguageModel) -> None:
    with local_lm.generate("Hello", max_new_tokens=2) as tracer:
        tracer.result.save()
    r = submit(client, key, tracer.graph.to_json())
    assert r.status_code == 202, r.get_json()
    assert r.get_json()["kind"] == "generate"


def test_queue_position_counts_jobs_ahead(client: FlaskClient, app: Flask, logits_graph: str) -> None:
    key = new_key(app)
    ids = [submit(client, key, logits_graph).get_json()["id"] for _ in range(3)]
    positions = [client.get(f"/v1/jobs/{i}", headers=key.headers).get_json()["position"] for i in ids]
    assert positions == sorted(positions) and len(set(positions)) == 3
    assert positions[1] - positions[0] >= 1


def test_submit_wakes_the_model_worker(app: Flask, client: FlaskClient, key: Key, logits_graph: str) -> None:
    path = services(app).config.wake_socket("tiny-gpt2")
    path.parent.mkdir(parents=True, exist_ok=True)
    with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as sock:
        sock.bind(str(path))
        sock.settimeout(2.0)
        try:
            assert submit(client, key, logits_graph).status_code == 202
            assert sock.recv(16) == b"job"
        finally:
            path.unlink()
    assert submit(client, key, logits_graph).status_code == 202     # nobody listening: still accepted


# ----- refused jobs --------------------------------------------------------------------------
@pytest.mark.parametrize("body, code", [
    (b"{not json", "invalid_json"),
    (b"\xff\xfe", "invalid_json"),
    (b"[" * 100_000, "invalid_json"),
    (b"[]", "bad_request"),
    (b'{"model": "tiny-gpt2"}', "bad_request"),
    (b'{"model": 3, "graph": "{}"}', "bad_request"),
    (b'{"model": "tiny-gpt2", "graph": {"nodes": []}}', "bad_request"),
    (b'{"model": "tiny-gpt2", "graph": "{}", "extra": 1}', "bad_request"),
    (json.dumps({"model": "tiny-gpt2", "graph": '{"version": "\\ud800"}'}).encode(), "format"),  # an escape: text
    (json.dumps({"model": "tiny-gpt2", "graph": "{\ud800}"}).encode(), "bad_request"),   # a lone surrogate: not text
    (b'{"model": "tiny-gpt2", "graph": "{\\"version\\": 1"}', "format"),
])
def test_malformed_requests_are_400(client: FlaskClient, key: Key, body: bytes, code: str) -> None:
    r = client.post("/v1/jobs", data=body, headers={**key.headers, "Content-Type": "application/json"})
    assert r.status_code == 400
    assert error_of(r)["code"] == code


def test_validator_errors_carry_node_and_source(client: FlaskClient, key: Key, gpt2_tokenizer: Any) -> None:
    wide = sc.LanguageModel(build_tiny("gpt2", width=128), tokenizer=gpt2_tokenizer)
    with wide.trace(IDS) as tracer:     # runs locally (width 128) but not on the served model (width 64)
        (wide.transformer.h[0].output[0] + torch.ones(128)).save()
    r = submit(client, key, tracer.graph.to_json())
    assert r.status_code == 400
    err = error_of(r)
    assert err["code"] == "shape" and "test_submission.py" in err["source"]
    llama = sc.LanguageModel(build_tiny("llama", layers=1, width=32), tokenizer=gpt2_tokenizer)
    with llama.trace(IDS) as tracer:
        llama.model.layers[0].output.save()
    err = error_of(submit(client, key, tracer.graph.to_json()))
    assert err["code"] == "module_path" and "model.layers" in err["message"]


def test_input_too_long_after_tokenizing(published: Path, local_lm: sc.LanguageModel) -> None:
    from validator import Limits

    app = create_app(make_config(published, limits=Limits(max_tokens_per_row=8)))
    key = new_key(app)
    with local_lm.trace("one two three four five six seven eight nine ten eleven") as tracer:
        local_lm.lm_head.output.save()
    r = submit(app.test_client(), key, tracer.graph.to_json())
    assert r.status_code == 400 and error_of(r)["code"] == "input_invalid"


def test_unknown_forbidden_and_loading_models(app: Flask, client: FlaskClient, logits_graph: str) -> None:
    key = new_key(app)
    assert error_of(submit(client, key, logits_graph, model="nope"))["code"] == "model_not_found"
    r = submit(client, key, logits_graph, model="sleepy")
    assert r.status_code == 503 and error_of(r)["code"] == "model_unavailable"
    assert int(r.headers["Retry-After"]) > 0
    limited = new_key(app, models=["sleepy"])
    r = submit(client, limited, logits_graph)
    assert r.status_code == 403 and error_of(r)["code"] == "model_forbidden"


def test_worker_down_is_503(published: Path, logits_graph: str) -> None:
    app = create_app(make_config(published))
    key = new_key(app)
    services(app).db.set_worker("tiny-gpt2", pid=None, state="down")
    try:
        r = submit(app.test_client(), key, logits_graph)
        assert r.status_code == 503 and "down" in error_of(r)["message"]
    finally:
        services(app).db.set_worker("tiny-gpt2", pid=1, state="ready")


@pytest.mark.parametrize("header, status, code", [
    (None, 401, "unauthorized"), ("Bearer nope", 401, "unauthorized"), ("Token abc", 401, "unauthorized")])
def test_missing_or_bad_key(client: FlaskClient, logits_graph: str, header: str | None, status: int,
                            code: str) -> None:
    headers = {"Authorization": header} if header else {}
    r = client.post("/v1/jobs", json={"model": "tiny-gpt2", "graph": logits_graph}, headers=headers)
    assert (r.status_code, error_of(r)["code"]) == (status, code)
    assert r.headers["WWW-Authenticate"].startswith("Bearer")


def test_wrong_secret_and_revoked_key(app: Flask, client: FlaskClient, logits_graph: str) -> None:
    key = new_key(app)
    wrong = Key(key.record, key.plaintext[:-1] + ("A" if key.plaintext[-1] != "A" else "B"))
    assert submit(client, wrong, logits_graph).status_code == 401
    job = submit(client, key, logits_graph).get_json()
    services(app).db.revoke_key(key.record.id)
    for r in (submit(client, key, logits_graph), client.get(f"/v1/jobs/{job['id']}", headers=key.headers),
              client.get("/v1/models", headers=key.headers)):
        assert (r.status_code, error_of(r)["code"]) == (403, "key_revoked")


def test_oversize_body_is_413_json(published: Path) -> None:
    app = create_app(make_config(published, max_request_mb=0.01))     # ~10 KB
    key = new_key(app)
    body = json.dumps({"model": "tiny-gpt2", "graph": "x" * 20_000})
    r = app.test_client().post("/v1/jobs", data=body, headers={**key.headers, "Content-Type": "application/json"})
    assert r.status_code == 413 and r.is_json
    assert error_of(r)["code"] == "request_too_large"


# ----- rate limit and quota ------------------------------------------------------------------
def test_rate_limit_is_429_with_retry_after(app: Flask, client: FlaskClient, logits_graph: str) -> None:
    db = services(app).db
    before = sum(db.status_counts().values())
    key = new_key(app, rate=2)
    assert [submit(client, key, logits_graph).status_code for _ in range(2)] == [202, 202]
    r = submit(client, key, logits_graph)
    assert r.status_code == 429 and error_of(r)["code"] == "rate_limited"
    assert 1 <= int(r.headers["Retry-After"]) <= 60
    assert submit(client, new_key(app, rate=2), logits_graph).status_code == 202    # other keys unaffected
    assert sum(db.status_counts().values()) == before + 3      # the refused job was not inserted


def test_daily_quota_is_429_until_midnight(app: Flask, client: FlaskClient, logits_graph: str) -> None:
    key = new_key(app, daily_jobs=2)
    assert [submit(client, key, logits_graph).status_code for _ in range(2)] == [202, 202]
    r = submit(client, key, logits_graph)
    assert r.status_code == 429 and error_of(r)["code"] == "quota_exceeded"
    now = time.time()
    assert abs(int(r.headers["Retry-After"]) - (86400 - now % 86400)) <= 2


def test_concurrent_submissions_respect_the_rate(published: Path, logits_graph: str) -> None:
    app = create_app(make_config(published))
    key = new_key(app, rate=5)
    codes: list[int] = []

    def post() -> None:
        codes.append(submit(app.test_client(), key, logits_graph).status_code)
    threads = [threading.Thread(target=post) for _ in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert sorted(codes) == [202] * 5 + [429] * 3


# ----- following, owning, cancelling ---------------------------------------------------------
def test_other_keys_jobs_are_404(app: Flask, client: FlaskClient, key: Key, logits_graph: str) -> None:
    job_id = submit(client, key, logits_graph).get_json()["id"]
    other = new_key(app)
    for r in (client.get(f"/v1/jobs/{job_id}", headers=other.headers),
              client.get(f"/v1/jobs/{job_id}/result", headers=other.headers),
              client.delete(f"/v1/jobs/{job_id}", headers=other.headers),
              client.get("/v1/jobs/job_doesnotexist", headers=key.headers),
              client.get("/v1/jobs/" + "x" * 500, headers=key.headers)):
        assert (r.status_code, error_of(r)["code"]) == (404, "job_not_found")


def test_cancel_queued_job(app: Flask, client: FlaskClient, key: Key, logits_graph: str) -> None:
    job_id = submit(client, key, logits_graph).get_json()["id"]
    r = client.delete(f"/v1/jobs/{job_id}", headers=key.headers)
    assert r.status_code == 200
    job = r.get_json()
    assert job["status"] == "CANCELLED" and job["position"] is None and job["finished"] is not None
    assert job["error"]["code"] == "cancelled"
    r = client.delete(f"/v1/jobs/{job_id}", headers=key.headers)
    assert (r.status_code, error_of(r)["code"]) == (409, "already_finished")


def test_cancel_running_job_sets_the_flag(app: Flask, client: FlaskClient, key: Key, logits_graph: str) -> None:
    job_id = submit(client, key, logits_graph).get_json()["id"]
    db = services(app).db
    db._con().execute("UPDATE jobs SET status = 'RUNNING', started = ? WHERE id = ?", (time.time(), job_id))
    job = client.delete(f"/v1/jobs/{job_id}", headers=key.headers).get_json()
    assert (job["status"], job["cancel_requested"]) == ("RUNNING", True)
    assert db.cancels_requested([job_id]) == [job_id]
    other = submit(client, key, logits_graph).get_json()["id"]
    assert db.cancels_requested([other, job_id, "job_unknown"]) == [job_id]   # one query for a co-batch


def test_wait_returns_early_when_the_job_ends(app: Flask, client: FlaskClient, key: Key,
                                               logits_graph: str) -> None:
    job_id = submit(client, key, logits_graph).get_json()["id"]
    timer = threading.Timer(0.2, lambda: finish_with_result(app, job_id, {"1": torch.ones(3)}))
    timer.start()
    start = time.monotonic()
    job = client.get(f"/v1/jobs/{job_id}?wait=10", headers=key.headers).get_json()
    elapsed = time.monotonic() - start
    timer.join()
    assert job["status"] == "COMPLETED" and 0.15 <= elapsed < 1.5, elapsed


def test_an_announced_end_answers_the_wait_at_once(app: Flask, client: FlaskClient, key: Key,
                                                   logits_graph: str) -> None:
    from sandbox_server.jobends import SAFETY_POLL_S, announce

    job_id = submit(client, key, logits_graph).get_json()["id"]
    ended: list[float] = []

    def end_and_announce() -> None:
        finish_with_result(app, job_id, {"1": torch.ones(3)})
        ended.append(time.monotonic())
        announce(services(app).config.web_socket_dir, [job_id])   # what the worker does after finish_job

    timer = threading.Timer(0.7, end_and_announce)   # between two of the waiter's database reads
    timer.start()
    job = client.get(f"/v1/jobs/{job_id}?wait=10", headers=key.headers).get_json()
    answered = time.monotonic()
    timer.join()
    assert job["status"] == "COMPLETED" and answered - ended[0] < SAFETY_POLL_S / 2


def test_wait_times_out_on_a_queued_job(client: FlaskClient, key: Key, logits_graph: str) -> None:
    job_id = submit(client, key, logits_graph).get_json()["id"]
    start = time.monotonic()
    job = client.get(f"/v1/jobs/{job_id}?wait=0.3", headers=key.headers).get_json()
    assert job["status"] == "QUEUED" and 0.28 <= time.monotonic() - start < 1.5
    for bad in ("-1", "nan", "inf", "soon"):
        r = client.get(f"/v1/jobs/{job_id}?wait={bad}", headers=key.headers)
        assert (r.status_code, error_of(r)["code"]) == (400, "bad_request")


def test_wait_is_capped_by_the_config(published: Path, logits_graph: str) -> None:
    from sandbox_server.config import JobsConfig

    app = create_app(make_config(published, jobs=JobsConfig(max_wait_s=0.2)))
    key = new_key(app)
    client = app.test_client()
    job_id = submit(client, key, logits_graph).get_json()["id"]
    start = time.monotonic()
    client.get(f"/v1/jobs/{job_id}?wait=30", headers=key.headers)
    assert time.monotonic() - start < 1.0


# ----- results -------------------------------------------------------------------------------
def test_result_download_and_views(app: Flask, client: FlaskClient, key: Key, logits_graph: str) -> None:
    from storage import decode_results, result_message, verify_signature

    job_id = submit(client, key, logits_graph).get_json()["id"]
    r = client.get(f"/v1/jobs/{job_id}/result", headers=key.headers)
    assert (r.status_code, error_of(r)["code"]) == (409, "not_ready")
    values = {"7": torch.arange(6.0).reshape(2, 3), "9": [1, "two", None]}
    data = finish_with_result(app, job_id, values)
    job = client.get(f"/v1/jobs/{job_id}", headers=key.headers).get_json()
    assert job["status"] == "COMPLETED" and job["position"] is None
    result = job["result"]
    assert result["url"] == f"/v1/jobs/{job_id}/result" and result["size"] == len(data)
    r = client.get(result["url"], headers=key.headers)
    assert r.status_code == 200 and r.mimetype == "application/octet-stream" and r.data == data
    assert r.headers["X-Sandbox-Sha256"] == result["sha256"]
    public = client.get("/v1/public-key").get_json()["public_key"]
    verify_signature(public, result_message(job_id, result["sha256"]), r.headers["X-Sandbox-Signature"])
    decoded = decode_results(r.data)
    assert torch.equal(decoded["7"], values["7"]) and decoded["9"] == [1, "two", None]


def test_expired_and_missing_results_are_410(app: Flask, client: FlaskClient, key: Key, logits_graph: str) -> None:
    s = services(app)
    first, second = (submit(client, key, logits_graph).get_json()["id"] for _ in range(2))
    finish_with_result(app, first, {"1": torch.zeros(1)})
    s.db.mark_expired(first)                          # the sweeper deleted it
    finish_with_result(app, second, {"1": torch.zeros(1)})
    job = s.db.get_job(second)
    assert job is not None and job.result is not None
    s.store.delete(job.result.key)                    # deleted from the store, database not yet updated
    for job_id in (first, second):
        r = client.get(f"/v1/jobs/{job_id}/result", headers=key.headers)
        assert (r.status_code, error_of(r)["code"]) == (410, "result_expired")
    view = client.get(f"/v1/jobs/{first}", headers=key.headers).get_json()
    assert view["result"] is None and view["result_expired"] is True


def test_failed_job_has_no_result(app: Flask, client: FlaskClient, key: Key, logits_graph: str) -> None:
    job_id = submit(client, key, logits_graph).get_json()["id"]
    error = {"code": "runtime", "message": "boom", "node": 3, "source": "x.py:1"}
    services(app).db.finish_job(job_id, JobStatus.ERROR, error=JobError.from_dict(error))
    job = client.get(f"/v1/jobs/{job_id}", headers=key.headers).get_json()
    assert job["status"] == "ERROR" and job["error"] == error
    r = client.get(f"/v1/jobs/{job_id}/result", headers=key.headers)
    assert (r.status_code, error_of(r)["code"]) == (409, "no_result")


# ----- one round trip: submit, wait and the result in one request ------------------------------
def end_when_queued(app: Flask, key: Key, values: dict[str, Any]) -> tuple[threading.Thread, list[bytes]]:
    """A stand-in worker: once ``key`` has a queued job, end it COMPLETED with ``values`` and announce it."""
    import sqlite3

    from sandbox_server.jobends import announce

    stored: list[bytes] = []

    def run() -> None:
        con = sqlite3.connect(services(app).config.db_path)
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline:
            row = con.execute("SELECT id FROM jobs WHERE key_id = ? AND status = 'QUEUED'", (key.record.id,)).fetchone()
            if row is not None:
                time.sleep(0.1)   # the request is waiting by now
                stored.append(finish_with_result(app, row[0], values))
                announce(services(app).config.web_socket_dir, [row[0]])
                break
            time.sleep(0.01)
        con.close()

    thread = threading.Thread(target=run)
    thread.start()
    return thread, stored


def test_submit_can_wait_and_bring_the_result_inline(app: Flask, client: FlaskClient, logits_graph: str) -> None:
    import base64
    import hashlib

    from storage import decode_results, result_message, verify_signature

    key = new_key(app)
    values = {"4": torch.arange(12.0).reshape(3, 4)}
    thread, stored = end_when_queued(app, key, values)
    start = time.monotonic()
    r = client.post("/v1/jobs?wait=10&inline=1", json={"model": "tiny-gpt2", "graph": logits_graph},
                    headers=key.headers)
    elapsed = time.monotonic() - start
    thread.join()
    assert r.status_code == 202 and elapsed < 5, (r.get_json(), elapsed)
    job = r.get_json()
    assert r.headers["Location"] == f"/v1/jobs/{job['id']}" and job["status"] == "COMPLETED"
    data = base64.b64decode(job["result"]["data"], validate=True)
    assert data == stored[0] and hashlib.sha256(data).hexdigest() == job["result"]["sha256"]
    public = client.get("/v1/public-key").get_json()["public_key"]
    verify_signature(public, result_message(job["id"], job["result"]["sha256"]), job["result"]["signature"])
    assert torch.equal(decode_results(data)["4"], values["4"])
    again = client.get(f"/v1/jobs/{job['id']}?inline=1", headers=key.headers).get_json()
    assert again["result"]["data"] == job["result"]["data"]
    assert "data" not in client.get(f"/v1/jobs/{job['id']}", headers=key.headers).get_json()["result"]


def test_a_submit_wait_that_runs_out_answers_the_queued_job(app: Flask, client: FlaskClient,
                                                            logits_graph: str) -> None:
    key = new_key(app)
    start = time.monotonic()
    r = client.post("/v1/jobs?wait=0.3&inline=1", json={"model": "tiny-gpt2", "graph": logits_graph},
                    headers=key.headers)
    assert r.status_code == 202 and r.get_json()["status"] == "QUEUED"
    assert 0.28 <= time.monotonic() - start < 1.5


@pytest.mark.parametrize("query", ["wait=-1", "wait=nan", "wait=soon", "inline=yes", "inline=2", "wait=1&inline="])
def test_bad_submit_parameters_are_400_before_anything_is_queued(app: Flask, client: FlaskClient,
                                                                 logits_graph: str, query: str) -> None:
    key = new_key(app)
    r = client.post(f"/v1/jobs?{query}", json={"model": "tiny-gpt2", "graph": logits_graph}, headers=key.headers)
    assert (r.status_code, error_of(r)["code"]) == (400, "bad_request")
    import sqlite3

    con = sqlite3.connect(services(app).config.db_path)
    assert con.execute("SELECT COUNT(*) FROM jobs WHERE key_id = ?", (key.record.id,)).fetchone()[0] == 0
    con.close()


def test_inline_skips_results_over_the_limit_and_unreadable_ones(published: Path, logits_graph: str) -> None:
    from sandbox_server.config import JobsConfig

    app = create_app(make_config(published, jobs=JobsConfig(inline_result_bytes=400)))
    key, client = new_key(app), app.test_client()
    small, large, gone = (submit(client, key, logits_graph).get_json()["id"] for _ in range(3))
    assert len(finish_with_result(app, small, {"1": torch.zeros(2)})) <= 400
    assert len(finish_with_result(app, large, {"1": torch.zeros(200)})) > 400
    finish_with_result(app, gone, {"1": torch.zeros(2)})
    record = services(app).db.get_job(gone)
    assert record is not None and record.result is not None
    services(app).store.delete(record.result.key)     # the store lost it: the answer still works, without data
    views = {j: client.get(f"/v1/jobs/{j}?inline=1", headers=key.headers).get_json()["result"]
             for j in (small, large, gone)}
    assert "data" in views[small] and "data" not in views[large] and "data" not in views[gone]
    assert all(v["url"] == f"/v1/jobs/{j}/result" for j, v in views.items())
