"""A real server in child processes (supervisor + gunicorn + one worker per model), for tests and benchmarks.

    from serverproc import TINY_MODELS, start_server     # tests/ is on sys.path

    with start_server(tmp_path, models=[TINY_MODELS["tiny-gpt2"]]) as server:
        key = server.create_key()
        requests.get(server.url + "/v1/models", headers={"Authorization": f"Bearer {key}"})

``start_server`` writes ``server.toml``, runs ``python -m sandbox_server.cli serve --config ...`` and
returns once ``/healthz`` says every model is ready (each worker imports torch and transformers, ~3 s;
tiny models build in milliseconds). The server's stdout and stderr go to ``<tmp_path>/server.log``,
which every failure message quotes. ``TINY_MODELS`` build exactly ``tests/conftest.py``'s
``build_tiny(arch)`` (4 layers, width 64, GPT-2 vocabulary, seed 0) with the "gpt2-bpe" tokenizer.
"""
from __future__ import annotations

import os
import secrets
import signal
import socket
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import requests

from sandbox_server.config import ServerConfig, dump_toml
from sandbox_server.db import Database

REPO_ROOT = Path(__file__).resolve().parent.parent
READY_TIMEOUT_S = 120.0
STOP_TIMEOUT_S = 30.0

_COMMON = {"vocab_size": 50257, "bos_token_id": 50256, "eos_token_id": 50256, "pad_token_id": 50256}
_DECODER = {"num_hidden_layers": 4, "hidden_size": 64, "intermediate_size": 128, "num_attention_heads": 4,
            "num_key_value_heads": 2, "max_position_embeddings": 128, **_COMMON}
TINY_CONFIGS: dict[str, dict[str, Any]] = {
    "gpt2": {"model_type": "gpt2", "n_layer": 4, "n_embd": 64, "n_head": 4, "n_positions": 128, **_COMMON},
    "llama": {"model_type": "llama", **_DECODER},
    "qwen2": {"model_type": "qwen2", **_DECODER},
}
TINY_MODELS: dict[str, dict[str, Any]] = {
    f"tiny-{arch}": {"name": f"tiny-{arch}", "source": "random", "config": cfg, "seed": 0, "tokenizer": "gpt2-bpe",
                     "description": f"tests/conftest.py build_tiny({arch!r})"}
    for arch, cfg in TINY_CONFIGS.items()
}


@dataclass
class RunningServer:
    """A started server; ``stop()``/``restart()`` it, or use it as a context manager."""

    url: str
    data_dir: Path
    config_path: Path
    log_path: Path
    env: dict[str, str]
    process: subprocess.Popen[bytes] | None = None
    models: list[str] = field(default_factory=list)

    # ----- lifecycle -------------------------------------------------------------------------
    def launch(self, timeout: float = READY_TIMEOUT_S) -> RunningServer:
        """Start the server process and wait until every model is ready."""
        log = open(self.log_path, "ab")
        self.process = subprocess.Popen(
            [sys.executable, "-m", "sandbox_server.cli", "serve", "--config", str(self.config_path)],
            cwd=REPO_ROOT, env=self.env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
        log.close()
        self.wait_ready(timeout)
        return self

    def wait_ready(self, timeout: float = READY_TIMEOUT_S, models: list[str] | None = None) -> None:
        """Poll /healthz until every model (or ``models``) is "ready"; fail with the server's log otherwise."""
        wanted = models if models is not None else self.models
        deadline = time.monotonic() + timeout
        last: Any = None
        while time.monotonic() < deadline:
            if self.process is not None and self.process.poll() is not None:
                raise RuntimeError(f"the server exited with code {self.process.returncode}\n{self.log_tail()}")
            try:
                last = requests.get(self.url + "/healthz", timeout=2).json()
                if all(last.get("models", {}).get(m) == "ready" for m in wanted):
                    return
            except (requests.RequestException, ValueError):
                pass
            time.sleep(0.05)
        raise TimeoutError(f"models {wanted} not ready after {timeout:g} s (last /healthz: {last})\n{self.log_tail()}")

    def stop(self, timeout: float = STOP_TIMEOUT_S) -> int:
        """SIGTERM the server and wait; SIGKILL it and everything it started if it does not stop in time."""
        proc = self.process
        if proc is None or proc.poll() is not None:
            return proc.returncode if proc is not None else 0
        family = descendants(proc.pid)
        proc.send_signal(signal.SIGTERM)
        try:
            return proc.wait(timeout)
        except subprocess.TimeoutExpired:
            for pid in [proc.pid, *family, *descendants(proc.pid)]:
                _kill(pid)
            return proc.wait()

    def kill(self) -> None:
        """SIGKILL the server and every process it started, as a crash or power cut would."""
        proc = self.process
        if proc is None or proc.poll() is not None:
            return
        for pid in [proc.pid, *descendants(proc.pid)]:
            _kill(pid)
        proc.wait()

    def restart(self, timeout: float = READY_TIMEOUT_S) -> RunningServer:
        self.stop()
        return self.launch(timeout)

    def __enter__(self) -> RunningServer:
        return self

    def __exit__(self, *exc: Any) -> None:
        self.stop()

    # ----- helpers ---------------------------------------------------------------------------
    def db(self) -> Database:
        return Database(self.data_dir / "sandbox.db")

    def create_key(self, name: str = "test", models: list[str] | None = None, rate: int | None = None,
                   daily_jobs: int | None = None) -> str:
        """A new API key ("isk_..."); no rate limit or quota unless given. Names are made unique."""
        from sandbox_server.keys import create_key

        db = self.db()
        if any(k.name == name and k.revoked is None for k in db.list_keys()):
            name = f"{name}-{secrets.token_hex(3)}"
        _, plaintext = create_key(db, name, models=models, rate=rate or 0, daily_jobs=daily_jobs or 0)
        return plaintext

    def worker_pid(self, model: str) -> int | None:
        """The pid of ``model``'s worker process as the database records it (None while none runs)."""
        worker = next((w for w in self.db().workers() if w.model == model), None)
        return worker.pid if worker is not None else None

    def log_tail(self, chars: int = 6000) -> str:
        try:
            text = self.log_path.read_text(errors="replace")
        except OSError:
            return "(no server log)"
        return f"--- server log ({self.log_path}) ---\n" + text[-chars:]


def start_server(tmp_path: Path, models: list[dict[str, Any]] | None = None, store: dict[str, Any] | None = None,
                 jobs: dict[str, Any] | None = None, limits: dict[str, Any] | None = None, port: int | None = None,
                 env: dict[str, str] | None = None, server: dict[str, Any] | None = None,
                 batching: dict[str, Any] | None = None, logging: dict[str, Any] | None = None) -> RunningServer:
    """Write ``<tmp_path>/server.toml`` and start the server; returns once every model is ready.

    ``models`` defaults to tiny-gpt2 alone; ``store``/``jobs``/``limits``/``server``/``batching``/``logging`` are TOML
    sections as dicts (e.g. ``store=s3_store(s3)``); ``env`` adds environment variables (e.g.
    SANDBOX_TEST_PARAM_HASH).
    """
    models = models if models is not None else [TINY_MODELS["tiny-gpt2"]]
    port = port or free_port()
    data_dir = tmp_path / "data"
    sections: dict[str, Any] = {
        "server": {"host": "127.0.0.1", "port": port, "data_dir": str(data_dir), "web_workers": 1,
                   "web_threads": 8, **(server or {})},
        "models": models, "store": store or {}, "jobs": jobs or {}, "limits": limits or {},
        "batching": batching or {}, "logging": logging or {}}
    config = ServerConfig.from_dict(sections)
    tmp_path.mkdir(parents=True, exist_ok=True)
    config_path = tmp_path / "server.toml"
    config_path.write_text(dump_toml(config))
    run_env = {**os.environ, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1",
               **(env or {})}
    run_env.pop("SANDBOX_DATA_DIR", None)
    run_env.pop("SANDBOX_PORT", None)
    running = RunningServer(url=f"http://127.0.0.1:{port}", data_dir=data_dir, config_path=config_path,
                            log_path=tmp_path / "server.log", env=run_env, models=[m["name"] for m in models])
    try:
        return running.launch()
    except BaseException:
        running.stop()
        raise


def s3_store(s3: Any, prefix: str = "") -> dict[str, Any]:
    """The [store] section for a ``tests/s3server.py`` S3Server."""
    return {"kind": "s3", "endpoint_url": s3.endpoint_url, "bucket": s3.bucket, "access_key": s3.access_key,
            "secret_key": s3.secret_key, "region": s3.region, "prefix": prefix}


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def descendants(pid: int) -> list[int]:
    """Every process below ``pid`` (from /proc), children before grandchildren."""
    parents: dict[int, list[int]] = {}
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            stat = (entry / "stat").read_text()
        except OSError:
            continue
        ppid = int(stat.rsplit(")", 1)[1].split()[1])
        parents.setdefault(ppid, []).append(int(entry.name))
    found: list[int] = []
    queue = [pid]
    while queue:
        children = parents.get(queue.pop(0), [])
        found += children
        queue += children
    return found


def _kill(pid: int) -> None:
    try:
        os.kill(pid, signal.SIGKILL)
    except (ProcessLookupError, PermissionError):
        pass
