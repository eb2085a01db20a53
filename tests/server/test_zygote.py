"""The zygote: processes forked from one pre-loaded parent are the supervisor's own children, start clean,
and share the parent's pages; without it (or when it dies) the server starts processes on its own."""
from __future__ import annotations

import os
import signal
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
import requests
from serverproc import TINY_MODELS, start_server

from sandbox_server.config import ServerConfig, dump_toml
from sandbox_server.zygote import Zygote, ZygoteError


@pytest.fixture(scope="module")
def zygote() -> Iterator[Zygote]:
    z = Zygote.start({**os.environ, "HF_HUB_OFFLINE": "1"})
    yield z
    z.close()


def _config(tmp_path: Path) -> Path:
    config = ServerConfig.from_dict({"server": {"data_dir": str(tmp_path / "data")},
                                     "models": [TINY_MODELS["tiny-gpt2"]]})
    path = tmp_path / "server.toml"
    path.write_text(dump_toml(config))
    return path


def _status(pid: int) -> dict[str, str]:
    lines = Path(f"/proc/{pid}/status").read_text().splitlines()
    return {k: v.strip() for k, _, v in (line.partition(":") for line in lines)}


def test_a_forked_process_is_our_child_with_its_own_group_and_exit_code(zygote: Zygote, tmp_path: Path) -> None:
    proc = zygote.spawn("worker", ["--config", str(tmp_path / "missing.toml"), "--model", "x"])
    assert int(_status(proc.pid)["PPid"]) == os.getpid() or proc.poll() is not None
    code = proc.wait(30)
    assert code != 0                                      # no such config: the worker's own error exit
    assert proc.poll() == code


def test_a_forked_worker_serves_and_stops_on_sigterm(zygote: Zygote, tmp_path: Path) -> None:
    from sandbox_server.db import Database

    config = _config(tmp_path)
    proc = zygote.spawn("worker", ["--config", str(config), "--model", "tiny-gpt2"])
    try:
        assert int(_status(proc.pid)["PPid"]) == os.getpid()
        assert os.getpgid(proc.pid) == proc.pid
        assert os.readlink(f"/proc/{proc.pid}/fd/0") == "/dev/null"
        assert "interp-sandbox worker" in Path(f"/proc/{proc.pid}/cmdline").read_text()
        db = Database(tmp_path / "data" / "sandbox.db")
        deadline = time.monotonic() + 60
        while not any(w.state == "ready" and w.pid == proc.pid for w in db.workers()):
            assert proc.poll() is None and time.monotonic() < deadline
            time.sleep(0.05)
        os.kill(proc.pid, signal.SIGTERM)
        assert proc.wait(30) == 0
    finally:
        if proc.poll() is None:
            os.kill(proc.pid, signal.SIGKILL)


def test_unknown_entry_points_are_refused_and_the_zygote_serves_on(zygote: Zygote, tmp_path: Path) -> None:
    with pytest.raises(ZygoteError, match="unknown entry point"):
        zygote.spawn("bash", ["-c", "true"])
    proc = zygote.spawn("worker", ["--config", str(tmp_path / "missing.toml"), "--model", "x"])
    assert proc.wait(30) != 0


def test_a_dead_zygote_is_reported_at_once(tmp_path: Path) -> None:
    z = Zygote.start({**os.environ, "HF_HUB_OFFLINE": "1"})
    config = _config(tmp_path)
    child = z.spawn("worker", ["--config", str(config), "--model", "tiny-gpt2"])   # holds no copy of the socket
    try:
        z.proc.kill()
        z.proc.wait()
        started = time.monotonic()
        with pytest.raises(ZygoteError):
            z.spawn("worker", ["--config", str(config), "--model", "tiny-gpt2"])
        assert time.monotonic() - started < 5
        assert child.poll() is None                        # its forked processes live on
    finally:
        os.kill(child.pid, signal.SIGKILL)
        child.wait(10)
        z.close()


def _children(pid: int) -> list[int]:
    found = []
    for entry in Path("/proc").iterdir():
        try:
            if entry.name.isdigit() and int(_status(int(entry.name))["PPid"]) == pid:
                found.append(int(entry.name))
        except (OSError, KeyError, ValueError):
            continue
    return found


def _pss_rss_mb(pid: int) -> tuple[float, float]:
    rows = {line.split(":")[0]: int(line.split()[1]) / 1024
            for line in Path(f"/proc/{pid}/smaps_rollup").read_text().splitlines()[1:]}
    return rows["Pss"], rows["Rss"]


@pytest.mark.slow
def test_a_served_model_shares_pages_with_the_web_tier_and_restarts_on_its_own(tmp_path: Path) -> None:
    with start_server(tmp_path) as server:
        worker = server.worker_pid("tiny-gpt2")
        assert worker is not None and int(_status(worker)["PPid"]) == server.process.pid
        assert "interp-sandbox worker" in Path(f"/proc/{worker}/cmdline").read_text()
        pss, rss = _pss_rss_mb(worker)
        assert rss - pss > 100               # torch's and transformers' pages, counted once across processes
        titles = [Path(f"/proc/{p}/cmdline").read_text() for p in _children(server.process.pid)]
        assert not any("zygote" in t for t in titles), titles
        os.kill(worker, signal.SIGKILL)
        deadline = time.monotonic() + 60
        while server.worker_pid("tiny-gpt2") in (None, worker):
            assert time.monotonic() < deadline, server.log_tail()
            time.sleep(0.1)
        server.wait_ready()
        again = server.worker_pid("tiny-gpt2")
        assert again is not None and "sandbox_server.worker" in Path(f"/proc/{again}/cmdline").read_text()
        assert "fork from it" in server.log_path.read_text()


@pytest.mark.slow
def test_without_shared_imports_every_process_starts_on_its_own(tmp_path: Path) -> None:
    with start_server(tmp_path, server={"shared_imports": False, "omp_wait_policy": "passive"}) as server:
        assert requests.get(server.url + "/healthz", timeout=10).json()["status"] == "ok"
        worker = server.worker_pid("tiny-gpt2")
        assert worker is not None and "sandbox_server.worker" in Path(f"/proc/{worker}/cmdline").read_text()
        assert "zygote" not in server.log_path.read_text()
        assert b"OMP_WAIT_POLICY=PASSIVE" in Path(f"/proc/{worker}/environ").read_bytes().split(b"\0")  # as set
