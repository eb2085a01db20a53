"""The worker's co-batching: claims of several users' jobs run merged, each job ends with its own result,
error or cancel; timeouts, max_batch = 1 and the fair queue order (the merging itself: test_cobatch.py).
"""
from __future__ import annotations

import dataclasses
import os
import threading
import time
from collections.abc import Iterator
from typing import Any

import pytest
import torch
from conftest import build_tiny
from serverproc import TINY_MODELS

import sandbox_client as sc
from sandbox_client.graph import Graph
from sandbox_server import cobatch
from sandbox_server import worker as worker_module
from sandbox_server.config import BatchingConfig, ConfigError, ServerConfig
from sandbox_server.types import JobRecord, JobStatus
from sandbox_server.worker import ModelWorker
from storage import decode_results

from .cobatchgraphs import edit_and_read, ids, trace
from .jobgraphs import PROMPT, Recorder, assert_same_values, job_graphs, run_locally, slow_graph


# ----- the worker ---------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def gpt2(gpt2_tokenizer: Any) -> sc.LanguageModel:
    return sc.LanguageModel(build_tiny("gpt2"), tokenizer=gpt2_tokenizer)


@pytest.fixture(scope="module")
def worker(tmp_path_factory: pytest.TempPathFactory) -> Iterator[ModelWorker]:
    data_dir = tmp_path_factory.mktemp("cobatch-worker")
    config = ServerConfig.from_dict({"server": {"data_dir": str(data_dir)}, "models": [TINY_MODELS["tiny-gpt2"]],
                                     "jobs": {"timeout_s": 30.0}, "batching": {"batch_wait_ms": 0}})
    w = ModelWorker(config, config.models[0])
    w.load()
    yield w


@pytest.fixture
def spy(worker: ModelWorker, monkeypatch: pytest.MonkeyPatch) -> dict[str, list[Any]]:
    """Records the merged groups (job counts) and the jobs run alone."""
    seen: dict[str, list[Any]] = {"merged": [], "alone": []}
    real_together, real_job = worker_module.run_together, worker.run_job

    def together(lm: sc.LanguageModel, graphs: list[Graph]) -> cobatch.BatchRun:
        seen["merged"].append(len(graphs))
        return real_together(lm, graphs)

    def alone(job: JobRecord) -> str:
        seen["alone"].append(job.id)
        return real_job(job)
    monkeypatch.setattr(worker_module, "run_together", together)
    monkeypatch.setattr(worker, "run_job", alone)
    return seen


def submit(worker: ModelWorker, graph: str | Graph, key: str = "k1", kind: str = "trace") -> JobRecord:
    text = graph.to_json() if isinstance(graph, Graph) else graph
    job = JobRecord(id=f"j_{os.urandom(6).hex()}", key_id=key, model="tiny-gpt2", kind=kind,
                    status=JobStatus.QUEUED, created=time.time())
    worker.db.insert_job(job, text)
    return job


def ended(worker: ModelWorker, job: JobRecord) -> JobRecord:
    done = worker.db.get_job(job.id)
    assert done is not None
    return done


def fetched(worker: ModelWorker, job: JobRecord) -> dict[str, Any]:
    done = ended(worker, job)
    assert done.status == JobStatus.COMPLETED, done.error
    assert done.result is not None
    return decode_results(worker.store.get(done.result.key))


def test_worker_merges_users_jobs_and_each_gets_its_own_result(worker: ModelWorker, gpt2: sc.LanguageModel,
                                                              spy: dict[str, list[Any]]) -> None:
    graphs = [trace(gpt2, edit_and_read, ids(20 + i)) for i in range(4)]
    jobs = [submit(worker, g, key=f"user{i}") for i, g in enumerate(graphs)]
    assert worker.run_queued() == 4
    assert spy["merged"] == [4] and spy["alone"] == []
    for job, graph in zip(jobs, graphs, strict=True):
        assert_same_values(fetched(worker, job), run_locally(gpt2, graph.to_json()))


def test_worker_every_kind_of_job_in_one_claim(worker: ModelWorker, gpt2: sc.LanguageModel,
                                                spy: dict[str, list[Any]]) -> None:
    """Gradient jobs run alone (and still match); the rest share batches where they fit."""
    graphs = job_graphs(gpt2)
    kinds = ["trace_edit", "gradient", "generate_steps", "skip", "apply", "trace_edit", "generate_steps"]
    jobs = [submit(worker, graphs[k], key=f"u{i}", kind="generate" if k.startswith("gen") else "trace")
            for i, k in enumerate(kinds)]
    assert worker.run_queued() == len(kinds)
    assert sorted(spy["merged"]) == [2, 4]              # 4 traces, 2 generations
    assert spy["alone"] == [jobs[1].id]
    for job, kind in zip(jobs, kinds, strict=True):
        assert_same_values(fetched(worker, job), run_locally(gpt2, graphs[kind]))


def test_a_failing_job_in_a_batch_of_8_leaves_the_others_correct(worker: ModelWorker, gpt2: sc.LanguageModel,
                                                                   spy: dict[str, list[Any]]) -> None:
    def bad(rec: Any) -> None:
        (rec.transformer.h[0].output @ torch.ones(3, 3)).save()
    graphs = [trace(gpt2, edit_and_read, ids(30 + i)) for i in range(8)]
    graphs[3] = trace(gpt2, bad, ids(33))
    jobs = [submit(worker, g, key=f"user{i}") for i, g in enumerate(graphs)]
    assert worker.run_queued() == 8
    assert spy["merged"] == [8] and spy["alone"] == [jobs[3].id]
    failed = ended(worker, jobs[3])
    assert failed.status == JobStatus.ERROR and failed.error is not None
    assert failed.error.code == "intervention" and "torch.ones(3, 3)" in failed.error.source
    for i, (job, graph) in enumerate(zip(jobs, graphs, strict=True)):
        if i != 3:
            assert_same_values(fetched(worker, job), run_locally(gpt2, graph.to_json()))


def test_a_batch_ends_in_one_announcement_after_every_result_is_recorded(worker: ModelWorker,
                                                                        gpt2: sc.LanguageModel) -> None:
    """The web tier hears of a co-batch's jobs once, when all of them are COMPLETED in the database: users
    woken one by one would take the CPU from the worker still storing the other results."""
    import socket

    from sandbox_server.wake import socket_address

    folder = worker.config.web_socket_dir
    folder.mkdir(parents=True, exist_ok=True)
    heard: list[tuple[list[str], list[str]]] = []      # (ids in one datagram, their statuses when it came)
    with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as listener:
        with socket_address(folder / "test-web.sock") as address:
            listener.bind(address)
        listener.settimeout(5)

        def listen() -> None:
            ids_ = listener.recv(65536).decode().split()
            records = [worker.db.get_job(i) for i in ids_]
            heard.append((ids_, [r.status if r else "missing" for r in records]))
        thread = threading.Thread(target=listen)
        thread.start()
        jobs = [submit(worker, trace(gpt2, edit_and_read, ids(60 + i)), key=f"user{i}") for i in range(5)]
        assert worker.run_queued() == 5
        thread.join()
        with pytest.raises(TimeoutError):
            listener.settimeout(0.2)
            listener.recv(65536)                            # nothing more: one datagram for the batch
    (folder / "test-web.sock").unlink()
    assert len(heard) == 1 and sorted(heard[0][0]) == sorted(j.id for j in jobs)   # claimed in fair order
    assert heard[0][1] == [JobStatus.COMPLETED] * 5


def test_finish_jobs_ends_only_jobs_still_running(worker: ModelWorker, gpt2: sc.LanguageModel) -> None:
    from sandbox_server.types import JobEnd, JobError

    jobs = [submit(worker, "{}", key=f"f{i}") for i in range(3)]
    assert worker.db.finish_job(jobs[1].id, JobStatus.CANCELLED)          # e.g. cancelled while queued
    ends = [JobEnd(j.id, JobStatus.ERROR, JobError("x", "m")) for j in jobs]
    assert worker.db.finish_jobs(ends) == [jobs[0].id, jobs[2].id]
    assert [ended(worker, j).status for j in jobs] == [JobStatus.ERROR, JobStatus.CANCELLED, JobStatus.ERROR]
    assert worker.db.finish_jobs(ends) == []


def test_an_invalid_job_in_a_batch_ends_error_and_the_rest_merge(worker: ModelWorker, gpt2: sc.LanguageModel,
                                                                  spy: dict[str, list[Any]]) -> None:
    good = trace(gpt2, edit_and_read, ids(40)).to_json()
    jobs = [submit(worker, good, key="a"), submit(worker, b"{not json", key="b"), submit(worker, good, key="c")]
    assert worker.run_queued() == 3
    assert spy["merged"] == [2] and spy["alone"] == [jobs[1].id]
    broken = ended(worker, jobs[1])
    assert broken.error is not None and broken.error.code == "format"
    assert_same_values(fetched(worker, jobs[0]), fetched(worker, jobs[2]))


def test_cancelling_one_job_of_a_batch_reruns_the_others(worker: ModelWorker, gpt2: sc.LanguageModel,
                                                         spy: dict[str, list[Any]]) -> None:
    slow = slow_graph(gpt2, max_new_tokens=12)
    jobs = [submit(worker, slow, key=f"u{i}", kind="generate") for i in range(3)]
    timer = threading.Timer(0.3, worker.db.request_cancel, args=(jobs[1].id,))
    timer.start()
    assert worker.run_queued() == 3
    timer.join()
    assert [ended(worker, j).status for j in jobs] == [JobStatus.COMPLETED, JobStatus.CANCELLED,
                                                       JobStatus.COMPLETED]
    assert spy["merged"] == [3, 2] and spy["alone"] == []
    assert_same_values(fetched(worker, jobs[0]), run_locally(gpt2, slow))


def test_a_merged_timeout_runs_each_job_alone_with_its_own_limit(worker: ModelWorker, gpt2: sc.LanguageModel,
                                                                  spy: dict[str, list[Any]]) -> None:
    """Who made the merged run slow cannot be told: each job gets its own full limit alone."""
    saved = worker.config
    worker.config = dataclasses.replace(saved, jobs=dataclasses.replace(saved.jobs, timeout_s=0.8))
    rec = Recorder(gpt2.runner.module, gpt2.tokenizer)
    with rec.generate(PROMPT, max_new_tokens=30) as tracer:     # ~0.1 s alone; slow_graph's 30 steps: 1.5-3 s
        tracer.result.save()
    fast = tracer.graph.to_json()
    try:
        jobs = [submit(worker, slow_graph(gpt2, max_new_tokens=30), key="slow", kind="generate"),
                submit(worker, fast, key="fast", kind="generate")]
        assert worker.run_queued() == 2
    finally:
        worker.config = saved
    assert spy["merged"] == [2] and spy["alone"] == [j.id for j in jobs]
    slow = ended(worker, jobs[0])
    assert slow.status == JobStatus.ERROR and slow.error is not None and slow.error.code == "timeout"
    assert_same_values(fetched(worker, jobs[1]), run_locally(gpt2, fast))


def test_max_batch_1_runs_one_job_at_a_time(worker: ModelWorker, gpt2: sc.LanguageModel,
                                            spy: dict[str, list[Any]]) -> None:
    saved = worker.config
    worker.config = dataclasses.replace(saved, batching=BatchingConfig(max_batch=1))
    try:
        good = trace(gpt2, edit_and_read, ids(50)).to_json()
        jobs = [submit(worker, good, key=f"one-at-a-time{i}") for i in range(3)]
        assert worker.run_queued() == 3
    finally:
        worker.config = saved
    assert spy["merged"] == [] and spy["alone"] == [j.id for j in jobs]
    assert all(ended(worker, j).status == JobStatus.COMPLETED for j in jobs)


def test_a_user_with_50_queued_jobs_does_not_delay_another(worker: ModelWorker, gpt2: sc.LanguageModel) -> None:
    good = trace(gpt2, edit_and_read, ids(60)).to_json()
    for _ in range(50):
        submit(worker, good, key="flood")
    late = submit(worker, good, key="late")
    claimed = [j for _ in range(2) for j in worker.db.claim_batch("tiny-gpt2", worker.pid, 1)]
    assert late.id in [j.id for j in claimed]
    worker.run_batch(claimed)
    assert worker.run_queued() == 49
    assert ended(worker, late).status == JobStatus.COMPLETED


def test_batching_config() -> None:
    config = ServerConfig.from_dict({"batching": {"max_batch": 4, "max_batch_tokens": 100, "batch_wait_ms": 5,
                                                  "burst_wait_ms": 20}})
    assert config.batching == BatchingConfig(max_batch=4, max_batch_tokens=100, batch_wait_ms=5, burst_wait_ms=20)
    assert ServerConfig.from_dict({}).batching == BatchingConfig(8, 4096, 2.0)
    with pytest.raises(ConfigError, match="max_batch"):
        ServerConfig.from_dict({"batching": {"max_batch": 0}})
    with pytest.raises(ConfigError, match="burst_wait_ms"):
        ServerConfig.from_dict({"batching": {"burst_wait_ms": -1}})


# ----- waiting for returning users ----------------------------------------------------------------
def _returning_worker(worker: ModelWorker, return_wait_ms: float, last_run_s: float,
                      returning: set[str], **waits: float) -> ModelWorker:
    batching = dataclasses.replace(worker.config.batching, **{"max_batch": 8, "batch_wait_ms": 2.0,
                                                              "return_wait_ms": return_wait_ms, **waits})
    w = ModelWorker(dataclasses.replace(worker.config, batching=batching), worker.cfg, db=worker.db)
    w._returning, w._last_run_s = set(returning), last_run_s
    return w


def test_a_claim_waits_for_the_users_whose_jobs_just_ended(worker: ModelWorker, gpt2: sc.LanguageModel) -> None:
    w = _returning_worker(worker, return_wait_ms=400, last_run_s=10.0, returning={"k1", "k2", "k3"})
    first = submit(w, trace(gpt2, edit_and_read, ids(3)), key="k1")
    graph = trace(gpt2, edit_and_read, ids(3))
    later: list[JobRecord] = []
    timer = threading.Timer(0.1, lambda: later.extend(submit(w, graph, key=k) for k in ("k2", "k3")))
    timer.start()
    start = time.monotonic()
    claimed = w.claim()
    timer.join()
    assert [j.id for j in claimed] == [first.id, *(j.id for j in later)]     # one batch, not two
    assert 0.08 < time.monotonic() - start < 0.35                              # it stopped once both returned


def test_the_wait_for_returning_users_is_bounded(worker: ModelWorker, gpt2: sc.LanguageModel) -> None:
    for returning, last_run_s, most_s in (({"k2"}, 10.0, 0.25), ({"k2"}, 0.04, 0.05), (set(), 10.0, 0.05)):
        w = _returning_worker(worker, return_wait_ms=150, last_run_s=last_run_s, returning=returning)
        job = submit(w, trace(gpt2, edit_and_read, ids(3)), key="k1")
        start = time.monotonic()
        assert [j.id for j in w.claim()] == [job.id]            # k2 never comes back
        took = time.monotonic() - start
        assert took < most_s, (returning, last_run_s, took)     # 150 ms cap, a quarter of a short run, or 2 ms
        w.db.finish_job(job.id, JobStatus.COMPLETED)


# ----- bursts: many jobs arriving at once --------------------------------------------------------
def _arriving(w: ModelWorker, graph: Graph, count: int, every_s: float) -> threading.Thread:
    """A thread that submits ``count`` jobs (keys b0, b1, ...), one every ``every_s`` seconds."""
    def run() -> None:
        for i in range(count):
            time.sleep(every_s)
            submit(w, graph, key=f"b{i}")
    thread = threading.Thread(target=run)
    thread.start()
    return thread


def _end_all(w: ModelWorker, claimed: list[JobRecord]) -> None:
    """End the claimed jobs and whatever is still queued, so the next test's claim starts from an empty queue."""
    while True:
        for job in claimed:
            w.db.finish_job(job.id, JobStatus.COMPLETED)
        claimed = w.db.claim_batch(w.cfg.name, w.pid, 64)
        if not claimed:
            return


def test_a_claim_keeps_filling_while_jobs_keep_arriving(worker: ModelWorker, gpt2: sc.LanguageModel) -> None:
    # gaps of 20 ms against a 60 ms batch_wait_ms: a margin of 3 for a loaded CI machine
    w = _returning_worker(worker, 0.0, 0.0, set(), max_batch=16, batch_wait_ms=60.0, burst_wait_ms=2000.0)
    graph = trace(gpt2, edit_and_read, ids(3))
    first = submit(w, graph, key="k1")
    arriving = _arriving(w, graph, 10, every_s=0.02)       # the last one 200 ms after the first
    claimed = w.claim()
    arriving.join()
    _end_all(w, claimed)
    assert claimed[0].id == first.id and len(claimed) == 11    # one batch: batch_wait_ms alone would end at 60 ms


def test_a_burst_fills_for_at_most_burst_wait_ms(worker: ModelWorker, gpt2: sc.LanguageModel) -> None:
    w = _returning_worker(worker, 0.0, 0.0, set(), max_batch=128, batch_wait_ms=100.0, burst_wait_ms=300.0)
    graph = trace(gpt2, edit_and_read, ids(3))
    submit(w, graph, key="k1")
    arriving = _arriving(w, graph, 80, every_s=0.01)       # a steady stream for 800 ms, gaps of 10 ms
    start = time.monotonic()
    claimed = w.claim()
    took = time.monotonic() - start
    arriving.join()
    _end_all(w, claimed)
    assert 0.3 <= took < 0.6 and 5 < len(claimed) < 70, (took, len(claimed))


def test_a_lone_job_waits_only_batch_wait_ms(worker: ModelWorker, gpt2: sc.LanguageModel) -> None:
    w = _returning_worker(worker, 0.0, 0.0, set(), batch_wait_ms=20.0, burst_wait_ms=5000.0)
    job = submit(w, trace(gpt2, edit_and_read, ids(3)), key="k1")
    start = time.monotonic()
    claimed = w.claim()
    took = time.monotonic() - start
    _end_all(w, claimed)
    assert [j.id for j in claimed] == [job.id] and took < 0.2
