"""sandbox_server.supervisor: start-up state, restarts, kills for time and memory, the sweeper, a clean stop.

Most tests drive ``Supervisor.tick()`` by hand with stand-in children (small Python processes that sleep,
exit or allocate), so every decision is checked without torch start-up costs; the last test runs
``serve`` for real and stops it.
"""
from __future__ import annotations

import dataclasses
import logging
import os
import signal
import stat
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
import requests
from serverproc import TINY_MODELS, start_server

from sandbox_server.config import ModelConfig, ServerConfig
from sandbox_server.modelinfo import read_model_info
from sandbox_server.supervisor import Supervisor, resident_bytes
from sandbox_server.types import JobRecord, JobStatus, ResultInfo
from storage import LocalStore, Signer

SLEEPER = [sys.executable, "-c", "import time; time.sleep(120)"]


def config_for(tmp_path: Path, **jobs: float) -> ServerConfig:
    return ServerConfig.from_dict({"server": {"data_dir": str(tmp_path / "data")},
                                   "models": [TINY_MODELS["tiny-gpt2"]],
                                   "jobs": {"sweep_interval_s": 3600.0, **jobs}})


@pytest.fixture
def make_supervisor(tmp_path: Path) -> Iterator[Callable[..., Supervisor]]:
    """Supervisor(config) whose children are stand-ins (``command``); every child is stopped afterwards."""
    made: list[Supervisor] = []

    def make(command: list[str] = SLEEPER, **jobs: float) -> Supervisor:
        sup = Supervisor(config_for(tmp_path, **jobs))
        sup.workers["tiny-gpt2"].command = list(command)
        sup.web.command = list(SLEEPER)
        made.append(sup)
        return sup

    yield make
    for sup in made:
        sup.stop()


def add_job(sup: Supervisor, job_id: str, status: str = JobStatus.QUEUED) -> JobRecord:
    job = JobRecord(id=job_id, key_id="k", model="tiny-gpt2", kind="trace", status=JobStatus.QUEUED,
                    created=time.time())
    sup.db.insert_job(job, "{}")
    if status == JobStatus.RUNNING:
        claimed = sup.db.claim_next("tiny-gpt2", sup.workers["tiny-gpt2"].pid or 1)
        assert claimed is not None and claimed.id == job_id
    elif status != JobStatus.QUEUED:
        sup.db.finish_job(job_id, status)
    return job


def status_of(sup: Supervisor, job_id: str) -> JobRecord:
    job = sup.db.get_job(job_id)
    assert job is not None
    return job


def tick_until(sup: Supervisor, done: Callable[[], bool], within: float = 10.0) -> None:
    deadline = time.monotonic() + within
    while not done():
        assert time.monotonic() < deadline
        sup.tick()
        time.sleep(0.02)


def test_prepare_ends_stale_running_jobs_and_keeps_the_rest(make_supervisor: Callable[..., Supervisor]) -> None:
    sup = make_supervisor()
    add_job(sup, "running", JobStatus.RUNNING)    # before "queued": add_job claims the oldest queued job
    add_job(sup, "queued")
    add_job(sup, "done", JobStatus.COMPLETED)
    ready = sup.config.model_dir("tiny-gpt2") / "ready"
    ready.parent.mkdir(parents=True)
    ready.write_text("1")                       # published by a worker of the previous server
    sup.prepare()
    assert status_of(sup, "queued").status == JobStatus.QUEUED
    assert status_of(sup, "done").status == JobStatus.COMPLETED
    stale = status_of(sup, "running")
    assert stale.status == JobStatus.ERROR and stale.error is not None
    assert stale.error.code == "server_restarted" and "submit it again" in stale.error.message
    assert not ready.exists()
    assert [(w.model, w.state) for w in sup.db.workers()] == [("tiny-gpt2", "loading")]
    key = sup.config.signing_key_path
    assert stat.S_IMODE(key.stat().st_mode) == 0o600
    assert Signer.load_or_create(key).fingerprint == Signer.load_or_create(key).fingerprint


def test_events_are_log_records_at_their_level(make_supervisor: Callable[..., Supervisor],
                                              caplog: pytest.LogCaptureFixture) -> None:
    sup = make_supervisor()
    with caplog.at_level(logging.INFO, logger="sandbox_server.supervisor"):
        sup.prepare()
        sup._spawn(sup.workers["tiny-gpt2"])
        sup._kill(sup.workers["tiny-gpt2"], "a test")
    events = [(r.name, r.levelname, r.getMessage()) for r in caplog.records]
    signing, started, killed = events
    assert signing[:2] == ("sandbox_server.supervisor", "INFO") and signing[2].startswith("result signing key ")
    assert started[:2] == ("sandbox_server.supervisor", "INFO") and started[2].startswith("started tiny-gpt2 (pid ")
    assert killed[:2] == ("sandbox_server.supervisor", "WARNING") and killed[2].endswith("): a test")


def test_embedded_config_is_written_for_the_children(tmp_path: Path) -> None:
    config = ServerConfig.embedded_default(tmp_path / "data", port=8123)
    (tmp_path / "data").mkdir()
    sup = Supervisor(config)
    assert sup.config_path == tmp_path / "data" / "server.toml"
    assert dataclasses.replace(ServerConfig.load(sup.config_path), source_path=None) == config
    assert sup.env["SANDBOX_CONFIG"] == str(sup.config_path) and sup.env["HF_HUB_OFFLINE"] == "1"
    assert sup.workers["smollm2-135m"].command[-4:] == ["--config", str(sup.config_path), "--model", "smollm2-135m"]


def test_omp_wait_policy_is_the_environments_unless_configured(tmp_path: Path,
                                                                monkeypatch: pytest.MonkeyPatch) -> None:
    from sandbox_server.config import ConfigError

    (tmp_path / "data").mkdir()
    monkeypatch.setenv("OMP_WAIT_POLICY", "ACTIVE")
    assert Supervisor(config_for(tmp_path)).env["OMP_WAIT_POLICY"] == "ACTIVE"
    monkeypatch.delenv("OMP_WAIT_POLICY")
    assert "OMP_WAIT_POLICY" not in Supervisor(config_for(tmp_path)).env
    passive = dataclasses.replace(config_for(tmp_path), omp_wait_policy="passive")
    assert Supervisor(passive).env["OMP_WAIT_POLICY"] == "PASSIVE"
    with pytest.raises(ConfigError, match="omp_wait_policy"):
        ServerConfig.from_dict({"server": {"omp_wait_policy": "spin"}})


def test_a_dead_worker_fails_its_job_and_restarts_with_backoff(make_supervisor: Callable[..., Supervisor]) -> None:
    sup = make_supervisor([sys.executable, "-c", "import sys; sys.exit(3)"])
    child = sup.workers["tiny-gpt2"]
    sup._spawn(child)
    add_job(sup, "victim", JobStatus.RUNNING)
    add_job(sup, "waiting")
    child.proc.wait()
    sup.tick()
    victim = status_of(sup, "victim")
    assert victim.status == JobStatus.ERROR and victim.error is not None
    assert victim.error.code == "worker_died" and "exit code 3" in victim.error.message
    assert status_of(sup, "waiting").status == JobStatus.QUEUED
    assert child.restarts == 1 and child.proc is not None        # first crash: restarted at once
    first = child.proc.pid
    child.proc.wait()
    sup.tick()                                                   # second quick crash: backs off 1 s
    assert child.proc is None and child.next_start - time.monotonic() > 0.5
    tick_until(sup, lambda: child.proc is not None)
    assert child.restarts == 2 and child.proc.pid != first


def test_a_job_past_timeout_and_grace_gets_its_worker_killed(make_supervisor: Callable[..., Supervisor]) -> None:
    sup = make_supervisor(timeout_s=0.2, kill_grace_s=0.2)
    child = sup.workers["tiny-gpt2"]
    sup._spawn(child)
    pid = child.proc.pid
    add_job(sup, "long", JobStatus.RUNNING)
    sup.tick()
    assert status_of(sup, "long").status == JobStatus.RUNNING    # within its time
    time.sleep(0.5)
    sup.tick()
    job = status_of(sup, "long")
    assert job.status == JobStatus.ERROR and job.error is not None and job.error.code == "timeout"
    assert "0.2 s" in job.error.message
    tick_until(sup, lambda: child.proc is not None and child.proc.pid != pid)
    assert child.restarts == 1 and child.backoff == 0.0          # a kill for a job's sake: no backoff


def test_resident_memory_over_the_cap_gets_the_worker_killed(make_supervisor: Callable[..., Supervisor]) -> None:
    grow = [sys.executable, "-c", "import time; time.sleep(0.3); b = b'x' * (300 * 2**20); time.sleep(120)"]
    sup = make_supervisor(grow, worker_memory_mb=100)
    child = sup.workers["tiny-gpt2"]
    sup._spawn(child)
    sup.db.set_worker("tiny-gpt2", child.proc.pid, "ready")     # as the worker reports once loaded
    sup.tick()
    assert child.base_rss is not None and child.base_rss < 100 * 2**20
    add_job(sup, "hog", JobStatus.RUNNING)
    pid = child.proc.pid
    tick_until(sup, lambda: status_of(sup, "hog").status == JobStatus.ERROR)
    error = status_of(sup, "hog").error
    assert error is not None and error.code == "memory_limit" and "100 MiB" in error.message
    tick_until(sup, lambda: child.proc is not None and child.proc.pid != pid)
    assert resident_bytes(pid) == 0


def test_sweeper_deletes_expired_results(make_supervisor: Callable[..., Supervisor]) -> None:
    sup = make_supervisor()
    store = LocalStore(sup.config.results_path)
    now = time.time()
    for job_id, expires in (("old", now - 1), ("fresh", now + 3600)):
        add_job(sup, job_id, JobStatus.RUNNING)
        key = f"results/{job_id}-0123456789abcdef0123456789abcdef"
        store.put(key, b"bundle")
        sup.db.finish_job(job_id, JobStatus.COMPLETED,
                          result=ResultInfo(key=key, sha256="0" * 64, signature="s", size=6, expires=expires))
    assert sup.sweep(now) == 1
    old, fresh = status_of(sup, "old"), status_of(sup, "fresh")
    assert old.result_expired and old.result is None
    assert not fresh.result_expired and fresh.result is not None and store.get(fresh.result.key) == b"bundle"
    assert sup.sweep(now) == 0
    assert sup.sweep(now + 7200) == 1


def test_a_dead_web_tier_is_restarted(make_supervisor: Callable[..., Supervisor]) -> None:
    sup = make_supervisor()
    sup._spawn(sup.web)
    first = sup.web.proc.pid
    os.killpg(first, signal.SIGKILL)
    sup.web.proc.wait()
    tick_until(sup, lambda: sup.web.alive() and sup.web.proc.pid != first)


@pytest.mark.slow
def test_serve_for_real_then_a_clean_stop(tmp_path: Path) -> None:
    """The real process tree: healthz ready, gunicorn restarted after a crash, SIGTERM stops everything."""
    server = start_server(tmp_path)
    try:
        worker = server.worker_pid("tiny-gpt2")
        assert worker is not None and read_model_info(server.data_dir / "models" / "tiny-gpt2", "tiny-gpt2")
        family = _children(server.process.pid)
        gunicorn = next(p for p in family if b"gunicorn" in Path(f"/proc/{p}/cmdline").read_bytes())
        os.killpg(gunicorn, signal.SIGKILL)
        deadline = time.monotonic() + 60
        while True:
            try:
                if requests.get(server.url + "/healthz", timeout=2).status_code == 200 and \
                        gunicorn not in _children(server.process.pid):
                    break
            except requests.RequestException:
                pass
            assert time.monotonic() < deadline, server.log_tail()
            time.sleep(0.1)
        assert server.worker_pid("tiny-gpt2") == worker        # the model worker did not notice
    finally:
        code = server.stop()
    assert code == 0, server.log_tail()
    assert all(not Path(f"/proc/{pid}").exists() for pid in family)
    assert [w.state for w in server.db().workers()] == ["down"]
    assert "server stopped" in server.log_path.read_text()


def _children(pid: int) -> list[int]:
    found = []
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                if int((entry / "stat").read_text().rsplit(")", 1)[1].split()[1]) == pid:
                    found.append(int(entry.name))
            except (OSError, ValueError):
                continue
    return found


def test_model_config_of_each_child_is_its_own(tmp_path: Path) -> None:
    models = [ModelConfig(**TINY_MODELS[n]) for n in ("tiny-gpt2", "tiny-llama")]
    config = dataclasses.replace(config_for(tmp_path), models=tuple(models))
    (tmp_path / "data").mkdir()
    sup = Supervisor(config)
    assert sorted(sup.workers) == ["tiny-gpt2", "tiny-llama"]
    assert all(c.command[-1] == name for name, c in sup.workers.items())
    web_args = ["--config", str(sup.config_path)]
    assert sup.web.command == [sys.executable, "-P", "-m", "sandbox_server.gunicorn_app", *web_args]
    assert sup.web.entry == ("web", web_args)
