"""sandbox_server.logs: records become text or JSON lines at the configured level, in this process and in the
server's real processes (a model worker on its own; the whole server with format = "json")."""
from __future__ import annotations

import io
import json
import logging
import os
import re
import subprocess
import sys
import warnings
from collections.abc import Iterator
from pathlib import Path

import pytest
import requests
from serverproc import TINY_MODELS, start_server

from sandbox_server.config import LoggingConfig, ServerConfig, dump_toml
from sandbox_server.logs import configure_logging

REPO = Path(__file__).resolve().parents[2]
TEXT_LINE = re.compile(r"^\d{4}-\d\d-\d\d \d\d:\d\d:\d\d,\d{3} (?P<level>[A-Z]+) (?P<logger>[\w.]+)\[(?P<pid>\d+)\]: "
                       r"(?P<message>.*)$")
JSON_TIME = re.compile(r"^\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{3}Z$")


@pytest.fixture
def stream() -> Iterator[io.StringIO]:
    """What configure_logging writes, for this test only; the root logger is put back afterwards."""
    root = logging.getLogger()
    handlers, level = list(root.handlers), root.level
    out = io.StringIO()
    yield out
    root.handlers[:] = handlers
    root.setLevel(level)
    logging.captureWarnings(False)


def test_json_lines_carry_time_level_logger_pid_message_and_extras(stream: io.StringIO) -> None:
    configure_logging(LoggingConfig(level="DEBUG", format="json"), stream)
    log = logging.getLogger("sandbox_server.example")
    log.debug("job %s ended %s", "job_1", "ERROR", extra={"model": "tiny-gpt2", "jobs": ["job_1"]})
    try:
        raise ValueError("boom")
    except ValueError:
        log.exception("sweeper failed")
    first, second = (json.loads(line) for line in stream.getvalue().splitlines())
    assert JSON_TIME.match(first.pop("time"))
    assert first == {"level": "DEBUG", "logger": "sandbox_server.example", "pid": os.getpid(),
                     "message": "job job_1 ended ERROR", "model": "tiny-gpt2", "jobs": ["job_1"]}
    assert second["level"] == "ERROR" and second["message"] == "sweeper failed"
    assert second["exception"].startswith("Traceback") and "ValueError: boom" in second["exception"]


def test_text_lines_and_the_level(stream: io.StringIO) -> None:
    configure_logging(LoggingConfig(level="WARNING", format="text"), stream)
    log = logging.getLogger("sandbox_server.example")
    log.info("not written")
    log.warning("worker %s ended", "tiny-gpt2")
    with warnings.catch_warnings():
        warnings.simplefilter("always")
        warnings.warn("a Python warning", UserWarning, stacklevel=1)
    lines = stream.getvalue().splitlines()
    assert "not written" not in stream.getvalue()
    match = TEXT_LINE.match(lines[0])
    assert match is not None, lines[0]
    assert match.groupdict() == {"level": "WARNING", "logger": "sandbox_server.example", "pid": str(os.getpid()),
                                 "message": "worker tiny-gpt2 ended"}
    assert " WARNING py.warnings[" in lines[1] and "a Python warning" in lines[1]   # not printed past the format


def test_configuring_again_replaces_only_its_own_handler(stream: io.StringIO, caplog: pytest.LogCaptureFixture) -> None:
    configure_logging(LoggingConfig(format="json"), stream)
    configure_logging(LoggingConfig(format="text"), stream)
    with caplog.at_level(logging.INFO):
        logging.getLogger("sandbox_server.example").info("once")
    assert stream.getvalue().count("once") == 1 and TEXT_LINE.match(stream.getvalue().strip())
    assert [r.getMessage() for r in caplog.records] == ["once"]     # pytest's handler is still there


def test_importing_the_server_configures_nothing() -> None:
    code = ("import logging, sandbox_server.supervisor, sandbox_server.worker, sandbox_server.wsgi, "
            "sandbox_server.app, sandbox_server.logs\n"
            "root = logging.getLogger()\n"
            "print(len(root.handlers), root.level == logging.WARNING)")
    out = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, timeout=120)
    assert out.stdout.split() == ["0", "True"], out.stderr


@pytest.mark.parametrize("level", ["ERROR", "CRITICAL"])
def test_a_model_worker_logs_at_the_configured_level(tmp_path: Path, level: str) -> None:
    """A worker whose model cannot load logs one ERROR record and exits 3; at CRITICAL it writes nothing."""
    broken = {"name": "broken", "source": "folder", "path": str(tmp_path / "no-such-folder")}
    config = ServerConfig.from_dict({"server": {"data_dir": str(tmp_path / "data")}, "models": [broken],
                                     "logging": {"level": level, "format": "text"}})
    (tmp_path / "server.toml").write_text(dump_toml(config))
    env = {k: v for k, v in os.environ.items() if not k.startswith("SANDBOX_")}
    out = subprocess.run([sys.executable, "-m", "sandbox_server.worker", "--config", str(tmp_path / "server.toml"),
                          "--model", "broken"], cwd=REPO, env=env, capture_output=True, text=True, timeout=120)
    assert out.returncode == 3, out.stderr
    lines = out.stderr.splitlines()
    if level == "CRITICAL":
        assert lines == []
        return
    (line,) = lines
    match = TEXT_LINE.match(line)
    assert match is not None, line
    assert (match["level"], match["logger"]) == ("ERROR", "sandbox_server.worker")
    assert match["message"].startswith("worker broken: cannot load the model: ")


@pytest.mark.slow
def test_a_real_server_writes_only_json_lines(tmp_path: Path) -> None:
    """Supervisor, model worker, gunicorn and the web app: every line of the shared log is one JSON record."""
    server = start_server(tmp_path, models=[TINY_MODELS["tiny-gpt2"]], logging={"format": "json"})
    try:
        assert requests.get(server.url + "/healthz", timeout=10).status_code == 200
    finally:
        code = server.stop()
    assert code == 0, server.log_tail()
    records = []
    for line in server.log_path.read_text().splitlines():
        record = json.loads(line)                  # raises on any line that is not JSON
        assert {"time", "level", "logger", "pid", "message"} <= set(record), line
        records.append(record)
    loggers = {r["logger"] for r in records}
    assert {"sandbox_server.supervisor", "sandbox_server.worker", "gunicorn.error", "gunicorn.access"} <= loggers
    ready = [r for r in records if r["logger"] == "sandbox_server.worker" and " ready in " in r["message"]]
    assert [(r["level"], r["model"]) for r in ready] == [("INFO", "tiny-gpt2")]
    assert any(r["message"] == "server stopped" for r in records)
