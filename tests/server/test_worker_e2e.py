"""The real thing: supervisor, gunicorn and model worker processes, driven over HTTP with ``requests``.

One server for the module (tiny-gpt2 and tiny-llama, short job limits, a memory cap, and the workers
writing a hash of their model after every job). Each test leaves the server serving; the last one
crashes and restarts it.
"""
from __future__ import annotations

import hashlib
import os
import signal
import time
from collections.abc import Iterator
from typing import Any

import pytest
import requests
import torch
from conftest import build_tiny
from serverproc import TINY_MODELS, RunningServer, start_server

import sandbox_client as sc
from sandbox_server.worker import model_hash
from storage import decode_results, result_message, verify_signature

from .jobgraphs import PROMPT, assert_same_values, hog_graph, job_graphs, logits_graph, run_locally, slow_graph

pytestmark = pytest.mark.slow

TIMEOUT_S = 1.5
GRACE_S = 1.5


class Api:
    """Raw HTTP calls of one API key."""

    def __init__(self, server: RunningServer, key: str) -> None:
        self.url = server.url
        self.headers = {"Authorization": f"Bearer {key}"}

    def submit(self, graph: str, model: str = "tiny-gpt2") -> dict[str, Any]:
        r = requests.post(f"{self.url}/v1/jobs", json={"model": model, "graph": graph}, headers=self.headers,
                          timeout=30)
        assert r.status_code == 202, r.text
        job: dict[str, Any] = r.json()
        return job

    def job(self, job_id: str, wait: float = 0) -> dict[str, Any]:
        r = requests.get(f"{self.url}/v1/jobs/{job_id}", params={"wait": wait}, headers=self.headers, timeout=60)
        assert r.status_code == 200, r.text
        job: dict[str, Any] = r.json()
        return job

    def finished(self, job_id: str, within: float = 60) -> dict[str, Any]:
        deadline = time.monotonic() + within
        job = self.job(job_id)
        while job["status"] not in ("COMPLETED", "ERROR", "CANCELLED"):
            assert time.monotonic() < deadline, job
            job = self.job(job_id, wait=min(10.0, max(deadline - time.monotonic(), 0.1)))
        return job

    def running(self, job_id: str, within: float = 30) -> dict[str, Any]:
        deadline = time.monotonic() + within
        while (job := self.job(job_id))["status"] == "QUEUED":
            assert time.monotonic() < deadline, job
            time.sleep(0.01)
        assert job["status"] == "RUNNING", job
        return job

    def result(self, job: dict[str, Any]) -> dict[str, Any]:
        """Download, check hash and signature against the server's published key, decode."""
        info = job["result"]
        r = requests.get(self.url + info["url"], headers=self.headers, timeout=30)
        assert r.status_code == 200, r.text
        data = r.content
        digest = hashlib.sha256(data).hexdigest()
        assert digest == info["sha256"] == r.headers["X-Sandbox-Sha256"] and len(data) == info["size"]
        public = requests.get(f"{self.url}/v1/public-key", timeout=10).json()["public_key"]
        verify_signature(public, result_message(job["id"], digest), info["signature"])
        return decode_results(data)

    def run(self, graph: str, model: str = "tiny-gpt2") -> dict[str, Any]:
        job = self.finished(self.submit(graph, model)["id"])
        assert job["status"] == "COMPLETED", job
        return self.result(job)


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[RunningServer]:
    with start_server(tmp_path_factory.mktemp("e2e"), models=[TINY_MODELS["tiny-gpt2"], TINY_MODELS["tiny-llama"]],
                      jobs={"timeout_s": TIMEOUT_S, "kill_grace_s": GRACE_S, "worker_memory_mb": 600},
                      limits={"max_extra_activation_bytes": 2**40},
                      env={"SANDBOX_TEST_PARAM_HASH": "1"}) as running:
        yield running


@pytest.fixture(scope="module")
def api(server: RunningServer) -> Api:
    return Api(server, server.create_key("e2e"))


@pytest.fixture(scope="module")
def lm(gpt2_tokenizer: Any) -> sc.LanguageModel:
    return sc.LanguageModel(build_tiny("gpt2"), tokenizer=gpt2_tokenizer)


def param_hashes(server: RunningServer, model: str = "tiny-gpt2") -> list[str]:
    path = server.data_dir / "test" / f"param-hashes-{model}.txt"
    return [line.split()[1] for line in path.read_text().splitlines()]


def wait_restarted(server: RunningServer, model: str, old_pid: int, within: float = 120) -> float:
    """Seconds until ``model`` has a new worker that is ready."""
    start = time.monotonic()
    while server.worker_pid(model) in (old_pid, None):
        assert time.monotonic() - start < within, server.log_tail()
        time.sleep(0.02)
    server.wait_ready(within, [model])
    return time.monotonic() - start


def test_trace_end_to_end(server: RunningServer, api: Api, gpt2_tokenizer: Any) -> None:
    """Submit, wait, download, verify the signature, decode: the logits of a raw forward, bit for bit."""
    ids = gpt2_tokenizer(PROMPT, return_tensors="pt").input_ids
    for arch in ("gpt2", "llama"):
        model = build_tiny(arch)
        (value,) = api.run(logits_graph(sc.LanguageModel(model, tokenizer=gpt2_tokenizer)), f"tiny-{arch}").values()
        with torch.no_grad():
            assert torch.equal(value, model(ids).logits[:, -1])


def test_every_kind_of_job_leaves_the_model_unchanged(server: RunningServer, api: Api, lm: sc.LanguageModel) -> None:
    for kind, graph in job_graphs(lm).items():
        assert_same_values(api.run(graph), run_locally(lm, graph)), kind
    hashes = param_hashes(server)
    assert len(hashes) >= 6
    assert set(hashes) == {model_hash(build_tiny("gpt2"))}     # after loading and after every job


def test_timeout_ends_the_job_and_the_worker_serves_on(server: RunningServer, api: Api, lm: sc.LanguageModel) -> None:
    pid = server.worker_pid("tiny-gpt2")
    job = api.finished(api.submit(slow_graph(lm))["id"])
    assert job["status"] == "ERROR" and job["error"]["code"] == "timeout", job
    assert f"{TIMEOUT_S:g} s" in job["error"]["message"] and "max_new_tokens" in job["error"]["message"]
    assert job["finished"] - job["started"] < TIMEOUT_S + GRACE_S      # stopped in the worker, not killed
    assert server.worker_pid("tiny-gpt2") == pid
    api.run(logits_graph(lm))
    assert len(set(param_hashes(server))) == 1


def test_cancel_while_running(server: RunningServer, api: Api, lm: sc.LanguageModel) -> None:
    job_id = api.submit(slow_graph(lm))["id"]
    api.running(job_id)
    r = requests.delete(f"{api.url}/v1/jobs/{job_id}", headers=api.headers, timeout=10)
    assert r.status_code == 200 and r.json()["cancel_requested"], r.text
    asked = time.monotonic()
    job = api.finished(job_id)
    assert job["status"] == "CANCELLED" and job["result"] is None, job
    assert time.monotonic() - asked < 1.0
    api.run(logits_graph(lm))


def test_killed_worker_fails_its_job_and_is_restarted(server: RunningServer, api: Api, lm: sc.LanguageModel) -> None:
    job_id = api.submit(slow_graph(lm))["id"]
    api.running(job_id)
    pid = server.worker_pid("tiny-gpt2")
    assert pid is not None
    os.kill(pid, signal.SIGKILL)
    job = api.finished(job_id)
    assert job["status"] == "ERROR" and job["error"]["code"] == "worker_died", job
    assert "signal 9" in job["error"]["message"] and "submit again" in job["error"]["message"]
    restart_s = wait_restarted(server, "tiny-gpt2", pid)
    print(f"worker restart after kill -9: {restart_s:.2f} s to ready")
    assert_same_values(api.run(logits_graph(lm)), run_locally(lm, logits_graph(lm)))
    assert len(set(param_hashes(server))) == 1


def test_stuck_worker_is_killed_after_the_grace_period(server: RunningServer, api: Api,
                                                       lm: sc.LanguageModel) -> None:
    """A worker that cannot stop by itself (here: SIGSTOP; in life, one long C call) is killed and restarted."""
    job_id = api.submit(slow_graph(lm))["id"]
    api.running(job_id)
    pid = server.worker_pid("tiny-gpt2")
    assert pid is not None
    os.kill(pid, signal.SIGSTOP)
    job = api.finished(job_id)
    assert job["status"] == "ERROR" and job["error"]["code"] == "timeout", job
    assert "restarted the model worker" in job["error"]["message"]
    assert job["finished"] - job["started"] >= TIMEOUT_S + GRACE_S
    wait_restarted(server, "tiny-gpt2", pid)
    api.run(logits_graph(lm))


def test_memory_cap_ends_the_job_and_the_worker_lives(server: RunningServer, api: Api, lm: sc.LanguageModel) -> None:
    pid = server.worker_pid("tiny-gpt2")
    job = api.finished(api.submit(hog_graph(lm))["id"])
    assert job["status"] == "ERROR" and job["error"]["code"] == "memory_limit", job
    assert "600 MiB" in job["error"]["message"] and job["error"]["source"]
    assert server.worker_pid("tiny-gpt2") == pid
    api.run(logits_graph(lm))
    assert len(set(param_hashes(server))) == 1


def test_queued_and_finished_jobs_survive_a_crash(server: RunningServer, api: Api, lm: sc.LanguageModel) -> None:
    """Crash (SIGKILL everything) with one job running and one queued behind it, then start again."""
    done = api.finished(api.submit(logits_graph(lm))["id"])
    running_id = api.submit(slow_graph(lm))["id"]
    api.running(running_id)
    pid = server.worker_pid("tiny-gpt2")
    assert pid is not None
    os.kill(pid, signal.SIGSTOP)            # frozen mid-job: the next job stays queued
    queued_id = api.submit(logits_graph(lm, "The capital of France is"))["id"]
    assert api.job(queued_id)["status"] == "QUEUED"
    server.kill()
    server.launch()

    crashed = api.finished(running_id)
    assert crashed["status"] == "ERROR" and crashed["error"]["code"] == "server_restarted", crashed
    queued = api.finished(queued_id)
    assert queued["status"] == "COMPLETED", queued
    assert_same_values(api.result(queued), run_locally(lm, logits_graph(lm, "The capital of France is")))
    again = api.job(done["id"])
    assert again["status"] == "COMPLETED" and again["result"]["signature"] == done["result"]["signature"]
    api.result(again)                         # still there, and the signing key is the same
