"""sandbox_server.cli: the ``interp-sandbox`` console entry, run as a real subprocess where it matters."""
from __future__ import annotations

import json
import os
import subprocess
import sys
import types
from pathlib import Path

import pytest

from sandbox_server.auth import authenticate
from sandbox_server.cli import main
from sandbox_server.config import ServerConfig
from sandbox_server.db import Database
from sandbox_server.errors import ApiError

REPO = Path(__file__).resolve().parents[2]


def cli(*args: str) -> subprocess.CompletedProcess[str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("SANDBOX_")}
    return subprocess.run([sys.executable, "-m", "sandbox_server.cli", *args], cwd=REPO, env=env,
                          capture_output=True, text=True, timeout=120)


def test_keys_create_list_revoke(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    created = cli("keys", "create", "--data-dir", str(tmp_path), "--name", "alice", "--models", "tiny-gpt2",
                  "--rate", "5", "--daily-jobs", "0")
    assert created.returncode == 0, created.stderr
    plaintext = created.stdout.strip()
    assert plaintext.startswith("isk_") and "\n" not in plaintext          # the key alone on stdout
    db = Database(tmp_path / "sandbox.db")
    record = authenticate(f"Bearer {plaintext}", db)
    assert (record.name, record.models, record.rate_per_minute, record.daily_jobs) == \
        ("alice", ("tiny-gpt2",), 5, None)
    assert record.id in created.stderr

    assert main(["keys", "list", "--data-dir", str(tmp_path)]) == 0
    listed = capsys.readouterr()
    assert "alice" in listed.out and record.id in listed.out and "active" in listed.out
    assert plaintext.split("_", 2)[2] not in listed.out + listed.err

    assert main(["keys", "revoke", "--data-dir", str(tmp_path), "alice"]) == 0
    with pytest.raises(ApiError) as err:
        authenticate(f"Bearer {plaintext}", db)
    assert err.value.code == "key_revoked"
    assert main(["keys", "list", "--data-dir", str(tmp_path)]) == 0
    assert "revoked" in capsys.readouterr().out


def test_errors_are_one_line_and_status_2(tmp_path: Path) -> None:
    result = cli("keys", "revoke", "--data-dir", str(tmp_path), "nobody")
    assert result.returncode == 2
    assert result.stderr.count("\n") == 1 and "no active key" in result.stderr and result.stdout == ""


def test_defaults_come_from_the_config(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    config = tmp_path / "server.toml"
    config.write_text(f'[server]\ndata_dir = "{tmp_path / "data"}"\n[keys]\nrate_per_minute = 7\ndaily_jobs = 9\n'
                      '[[models]]\nname = "m1"\nsource = "random"\nconfig = { model_type = "gpt2" }\n')
    assert main(["keys", "create", "--config", str(config), "--name", "bob"]) == 0
    assert main(["keys", "create", "--config", str(config), "--name", "carol", "--rate", "0"]) == 0
    capsys.readouterr()
    assert main(["keys", "list", "--config", str(config), "--json"]) == 0
    keys = json.loads(capsys.readouterr().out)
    assert [(k["name"], k["rate_per_minute"], k["daily_jobs"], k["models"]) for k in keys] == \
        [("bob", 7, 9, None), ("carol", None, 9, None)]
    assert all("secret" not in k and "secret_hash" not in k for k in keys)


@pytest.mark.parametrize("argv, message", [
    (["keys", "list"], "--config"),
    (["keys", "create", "--name", "x", "--models", "nope"], "no model nope"),
    (["keys", "create", "--name", "x", "--rate", "-3"], "rate"),
    (["keys", "list", "--config", "/does/not/exist.toml"], "no config file"),
    (["serve", "--config", "a.toml", "--embedded"], "not both"),
    (["serve", "--embedded", "--models", "tiny-gpt2,nope"], "no model nope"),
    (["serve", "--config", "a.toml", "--models", "tiny-gpt2"], "with --embedded"),
])
def test_command_errors(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str],
                        argv: list[str], message: str) -> None:
    monkeypatch.delenv("SANDBOX_CONFIG", raising=False)
    if "--config" not in argv and argv != ["keys", "list"]:
        argv = [*argv, "--data-dir", str(tmp_path)]
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert message in err and err.count("\n") == 1


def test_config_from_the_environment(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                     capsys: pytest.CaptureFixture[str]) -> None:
    config = tmp_path / "server.toml"
    config.write_text(f'[server]\ndata_dir = "{tmp_path / "data"}"\n')
    monkeypatch.setenv("SANDBOX_CONFIG", str(config))
    assert main(["keys", "create", "--name", "dora"]) == 0
    assert capsys.readouterr().out.startswith("isk_")
    assert [k.name for k in Database(tmp_path / "data" / "sandbox.db").list_keys()] == ["dora"]


@pytest.fixture
def served(monkeypatch: pytest.MonkeyPatch) -> list[ServerConfig]:
    """The configs ``serve`` hands to the supervisor (a stand-in that records them and returns at once)."""
    seen: list[ServerConfig] = []
    fake = types.ModuleType("sandbox_server.supervisor")
    fake.serve = seen.append  # type: ignore[attr-defined]
    monkeypatch.setitem(sys.modules, "sandbox_server.supervisor", fake)
    return seen


def test_serve_hands_the_config_to_the_supervisor(tmp_path: Path, served: list[ServerConfig]) -> None:
    assert main(["serve", "--embedded", "--data-dir", str(tmp_path), "--port", "8123"]) == 0
    assert served[0].port == 8123 and served[0].data_dir == tmp_path.resolve()
    assert [m.name for m in served[0].models] == ["smollm2-135m", "tiny-gpt2"]


def test_serve_embedded_serves_the_models_asked_for(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                                    served: list[ServerConfig]) -> None:
    monkeypatch.chdir(tmp_path)
    assert main(["serve", "--embedded", "--models", "tiny-gpt2"]) == 0
    assert [m.name for m in served[0].models] == ["tiny-gpt2"] and served[0].models[0].source == "random"
    assert served[0].data_dir == tmp_path.resolve() / ".sandbox-data" and served[0].port == 8000


def test_serve_port_reaches_the_processes_that_load_the_config(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                                               served: list[ServerConfig]) -> None:
    """The web tier and the workers load the config file themselves: --port must hold for them too."""
    config = tmp_path / "server.toml"
    config.write_text(f'[server]\ndata_dir = "{tmp_path / "data"}"\nport = 8001\n')
    monkeypatch.setenv("SANDBOX_PORT", "8001")           # so that monkeypatch restores the variable afterwards
    assert main(["serve", "--config", str(config), "--port", "8124"]) == 0
    assert served[0].port == 8124 and served[0].source_path == config.resolve()
    assert ServerConfig.load(config).port == 8124        # what a child process reads with the inherited environment
