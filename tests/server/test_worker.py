"""sandbox_server.worker in this process: one claimed job at a time, against local runs of the same graphs.

No supervisor or web tier: jobs go into the database as the web tier inserts them, and the test claims
and runs them as the worker loop does (``tests/server/test_worker_e2e.py`` runs the real processes).
"""
from __future__ import annotations

import dataclasses
import hashlib
import logging
import os
import socket
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import torch
from conftest import build_tiny
from serverproc import TINY_MODELS

import sandbox_client as sc
from sandbox_server.config import ServerConfig
from sandbox_server.modelinfo import read_model_info
from sandbox_server.types import JobRecord, JobStatus
from sandbox_server.wake import bind_wake_socket, send_wake, wait_for_wake
from sandbox_server.worker import ModelWorker, model_flags, model_hash
from storage import decode_results, result_message, verify_signature

from .jobgraphs import PROMPT, Recorder, assert_same_values, job_graphs, logits_graph, run_locally, slow_graph


@pytest.fixture(scope="module")
def lm(gpt2_tokenizer: Any) -> sc.LanguageModel:
    return sc.LanguageModel(build_tiny("gpt2"), tokenizer=gpt2_tokenizer)


@pytest.fixture(scope="module")
def graphs(lm: sc.LanguageModel) -> dict[str, str]:
    return job_graphs(lm)


@pytest.fixture(scope="module")
def worker(tmp_path_factory: pytest.TempPathFactory) -> Iterator[ModelWorker]:
    data_dir = tmp_path_factory.mktemp("worker")
    config = ServerConfig.from_dict({"server": {"data_dir": str(data_dir)}, "models": [TINY_MODELS["tiny-gpt2"]],
                                     "jobs": {"timeout_s": 30.0}})
    w = ModelWorker(config, config.models[0])
    w.load()
    base = w.config
    yield w
    w.config = base


@pytest.fixture
def config(worker: ModelWorker) -> Iterator[None]:
    """Lets a test change ``worker.config`` (limits, timeouts); put back afterwards."""
    saved = worker.config
    yield
    worker.config = saved


def submit(worker: ModelWorker, graph: str | bytes, kind: str = "trace") -> JobRecord:
    job = JobRecord(id=f"j_{os.urandom(6).hex()}", key_id="k1", model="tiny-gpt2", kind=kind,
                    status=JobStatus.QUEUED, created=time.time())
    worker.db.insert_job(job, graph)
    return job


def run(worker: ModelWorker, graph: str | bytes, kind: str = "trace") -> JobRecord:
    job = submit(worker, graph, kind)
    claimed = worker.db.claim_next("tiny-gpt2", worker.pid)
    assert claimed is not None and claimed.id == job.id
    worker.run_job(claimed)
    done = worker.db.get_job(job.id)
    assert done is not None
    return done


def fetch(worker: ModelWorker, job: JobRecord) -> dict[str, Any]:
    """The job's bundle from the store, after checking its hash and signature as a client does."""
    assert job.result is not None
    data = worker.store.get(job.result.key)
    assert hashlib.sha256(data).hexdigest() == job.result.sha256 and len(data) == job.result.size
    verify_signature(worker.signer.public_key_b64, result_message(job.id, job.result.sha256), job.result.signature)
    return decode_results(data)


def test_load_publishes_the_model(worker: ModelWorker) -> None:
    info = read_model_info(worker.config.model_dir("tiny-gpt2"), "tiny-gpt2")
    assert info is not None and info.spec.name == "tiny-gpt2" and "transformer.h.3.mlp" in info.spec.modules
    assert info.info["tokenizer"] and (info.tokenizer_dir / "tokenizer.json").is_file()
    (record,) = worker.db.workers()
    assert (record.model, record.pid, record.state) == ("tiny-gpt2", os.getpid(), "ready")
    assert worker.config.signing_key_path.is_file()


def test_trace_matches_a_raw_forward(worker: ModelWorker, lm: sc.LanguageModel) -> None:
    job = run(worker, logits_graph(lm))
    assert job.status == JobStatus.COMPLETED and job.error is None
    assert job.result is not None and abs(job.result.expires - time.time() - worker.config.jobs.result_ttl_s) < 60
    (value,) = fetch(worker, job).values()
    ids = lm.tokenizer(PROMPT, return_tensors="pt").input_ids
    with torch.no_grad():
        expected = build_tiny("gpt2")(ids).logits[:, -1]
    assert torch.equal(value, expected)


@pytest.mark.parametrize("kind", ["trace_edit", "gradient", "generate_steps", "skip", "apply"])
def test_every_kind_of_job_matches_a_local_run_and_leaves_the_model_unchanged(
        worker: ModelWorker, lm: sc.LanguageModel, graphs: dict[str, str], kind: str) -> None:
    before = model_hash(worker.model)
    job = run(worker, graphs[kind], "generate" if kind.startswith("generate") else "trace")
    assert job.status == JobStatus.COMPLETED, job.error
    assert_same_values(fetch(worker, job), run_locally(lm, graphs[kind]))
    assert model_hash(worker.model) == before


def test_a_stored_graph_is_validated_again(worker: ModelWorker, lm: sc.LanguageModel) -> None:
    """A graph that slipped into the queue unvalidated is refused with the validator's code, not run."""
    text = logits_graph(lm).replace('"lm_head"', '"lm_head.weight.data"')
    job = run(worker, text)
    assert job.status == JobStatus.ERROR and job.error is not None and job.error.code == "module_path"
    assert job.result is None
    broken = run(worker, b"{not json")
    assert broken.error is not None and broken.error.code == "format"


def test_an_intervention_error_points_at_the_users_line(worker: ModelWorker, lm: sc.LanguageModel) -> None:
    rec = Recorder(lm.runner.module, lm.tokenizer)
    with rec.trace(PROMPT) as tracer:
        (rec.transformer.h[0].output @ torch.ones(3, 3)).save()   # wrong shape: only fails when it runs
    job = run(worker, tracer.graph.to_json())
    assert job.status == JobStatus.ERROR and job.error is not None
    assert job.error.code == "intervention" and "torch.ones(3, 3)" in job.error.source
    assert "Traceback" not in job.error.message


def test_result_over_the_limit_is_refused_and_not_stored(worker: ModelWorker, lm: sc.LanguageModel,
                                                         config: None) -> None:
    worker.config = dataclasses.replace(worker.config, limits=dataclasses.replace(worker.config.limits,
                                                                                  max_result_bytes=1000))
    results = worker.config.results_path
    files = sorted(results.rglob("*")) if results.exists() else []
    job = run(worker, logits_graph(lm))
    assert job.error is not None and job.error.code == "result_too_large"
    assert (sorted(results.rglob("*")) if results.exists() else []) == files


def test_timeout_ends_the_job_and_the_next_one_runs(worker: ModelWorker, lm: sc.LanguageModel, config: None) -> None:
    worker.config = dataclasses.replace(worker.config, jobs=dataclasses.replace(worker.config.jobs, timeout_s=0.3))
    before = model_hash(worker.model)
    start = time.monotonic()
    job = run(worker, slow_graph(lm), "generate")
    assert time.monotonic() - start < 2.0
    assert job.status == JobStatus.ERROR and job.error is not None and job.error.code == "timeout"
    assert "0.3 s" in job.error.message
    assert model_hash(worker.model) == before
    assert run(worker, logits_graph(lm)).status == JobStatus.COMPLETED


def spin(h):
    total = 0
    for i in range(1000):
        for j in range(1000):
            total = total + i * j
    return h * 0 + total


def test_a_user_function_loop_stops_at_the_jobs_deadline(worker: ModelWorker, lm: sc.LanguageModel,
                                                         config: None) -> None:
    """The loop runs in one module-free stretch, where the forward pre-hook cannot stop it: the user function's
    own time budget, bound to the job's deadline, does (instead of the supervisor killing the worker)."""
    worker.config = dataclasses.replace(worker.config, jobs=dataclasses.replace(worker.config.jobs, timeout_s=0.2))
    rec = Recorder(lm.runner.module, lm.tokenizer)
    with rec.trace(PROMPT) as tracer:
        sc.apply(spin, rec.transformer.h[0].output).save()
    start = time.monotonic()
    job = run(worker, tracer.graph.to_json())
    assert time.monotonic() - start < 1.5
    assert job.status == JobStatus.ERROR and job.error is not None and job.error.code == "timeout"
    assert run(worker, logits_graph(lm)).status == JobStatus.COMPLETED


def test_cancel_while_running(worker: ModelWorker, lm: sc.LanguageModel) -> None:
    job = submit(worker, slow_graph(lm), "generate")
    claimed = worker.db.claim_next("tiny-gpt2", worker.pid)
    assert claimed is not None
    timer = threading.Timer(0.3, worker.db.request_cancel, args=(job.id,))
    timer.start()
    start = time.monotonic()
    assert worker.run_job(claimed) == JobStatus.CANCELLED
    assert time.monotonic() - start < 1.0
    done = worker.db.get_job(job.id)
    assert done is not None and done.status == JobStatus.CANCELLED and done.result is None


def test_flags_a_job_changed_are_restored(worker: ModelWorker, lm: sc.LanguageModel,
                                         caplog: pytest.LogCaptureFixture) -> None:
    flags = model_flags(worker.model)
    worker.model.transformer.h[0].train()           # as if something in a job had flipped them
    worker.model.lm_head.weight.requires_grad_(False)
    with caplog.at_level(logging.WARNING, logger="sandbox_server.worker"):
        assert run(worker, logits_graph(lm)).status == JobStatus.COMPLETED
    assert model_flags(worker.model) == flags
    (record,) = [r for r in caplog.records if "flags" in r.getMessage()]     # a warning record, not a print
    assert (record.name, record.levelname) == ("sandbox_server.worker", "WARNING")
    assert record.getMessage() == "worker tiny-gpt2: a job changed requires_grad/training flags; restored"
    assert record.model == "tiny-gpt2"              # type: ignore[attr-defined]   # an extra field of the record


def test_serve_wakes_on_a_datagram(worker: ModelWorker, lm: sc.LanguageModel) -> None:
    """The loop claims a job as soon as the web tier's datagram arrives, long before its 0.2 s poll."""
    thread = threading.Thread(target=worker.serve)
    thread.start()
    try:
        graph = logits_graph(lm)
        path = worker.config.wake_socket("tiny-gpt2")
        deadline = time.monotonic() + 10
        while not path.exists() and time.monotonic() < deadline:
            time.sleep(0.01)
        assert (path.parent.stat().st_mode & 0o777) == 0o700
        time.sleep(0.3)            # the loop is now asleep on the socket
        waits = []
        for _ in range(5):
            job = submit(worker, graph)
            start = time.monotonic()
            with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as sock:
                sock.sendto(b"job", str(path))
            while (worker.db.get_job(job.id) or job).status != JobStatus.COMPLETED:
                assert time.monotonic() - start < 5
                time.sleep(0.002)
            waits.append(time.monotonic() - start)
            time.sleep(0.25)
        assert sorted(waits)[2] < 0.15, waits
    finally:
        worker.stopping = True
        thread.join(10)
        worker.stopping = False
    assert not path.exists()
    assert worker.db.workers()[0].state == "down"
    worker.db.set_worker("tiny-gpt2", worker.pid, "ready")


def test_wake_socket_with_a_path_longer_than_af_unix_allows(tmp_path: Path) -> None:
    path = tmp_path / ("x" * 90) / "run" / "model.sock"
    assert len(str(path)) > 108
    sock = bind_wake_socket(path)
    try:
        assert path.exists()
        assert not wait_for_wake(sock, 0.01)
        for _ in range(3):
            send_wake(path)
        assert wait_for_wake(sock, 1.0)
        assert not wait_for_wake(sock, 0.01)    # all three were drained by one wake
    finally:
        sock.close()
