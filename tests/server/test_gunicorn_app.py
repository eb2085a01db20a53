"""sandbox_server.gunicorn_app: the web tier's gunicorn settings come from the server's TOML alone.

Reference: the numbers written into the test's own server.toml (and gunicorn's defaults for what we never
set); the real web tier under the supervisor is exercised by test_supervisor.py and tests/test_wheel_install.py.
"""
from __future__ import annotations

from pathlib import Path

import pytest

from sandbox_server.config import ServerConfig
from sandbox_server.gunicorn_app import GunicornApp, gunicorn_settings, main


def _config(tmp_path: Path) -> ServerConfig:
    path = tmp_path / "server.toml"
    path.write_text(f'[server]\ndata_dir = "{tmp_path / "data"}"\nhost = "127.0.0.2"\nport = 8123\n'
                    'web_workers = 3\nweb_threads = 5\n[jobs]\nmax_wait_s = 42.0\n')
    return ServerConfig.load(path)


def test_settings_follow_the_server_config(tmp_path: Path) -> None:
    cfg = GunicornApp(_config(tmp_path)).cfg
    assert cfg.bind == ["127.0.0.2:8123"] and cfg.workers == 3 and cfg.threads == 5
    assert cfg.worker_class_str == "gthread" and cfg.timeout == 72      # max_wait_s + 30: above the longest poll
    assert cfg.keepalive == 5 and cfg.graceful_timeout == 10 and not cfg.preload_app
    assert cfg.accesslog == "-" and cfg.limit_request_line == 8190 and cfg.limit_request_fields == 100
    assert cfg.proc_name == "interp-sandbox web"
    if "control_socket_disable" in cfg.settings:                        # gunicorn >= 24
        assert cfg.control_socket_disable is True


def test_nothing_outside_the_config_changes_how_it_serves(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """gunicorn's own command line reads ./gunicorn.conf.py and $GUNICORN_CMD_ARGS; the web tier reads neither."""
    config = _config(tmp_path)
    (tmp_path / "gunicorn.conf.py").write_text("workers = 7\nbind = '0.0.0.0:9999'\n")
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("GUNICORN_CMD_ARGS", "--workers 9 --bind 0.0.0.0:9998")
    cfg = GunicornApp(config).cfg
    assert cfg.workers == 3 and cfg.bind == ["127.0.0.2:8123"]


def test_every_setting_is_one_gunicorn_knows(tmp_path: Path) -> None:
    app = GunicornApp(_config(tmp_path))
    unknown = set(gunicorn_settings(app.config)) - set(app.cfg.settings) - {"control_socket_disable"}
    assert not unknown


def test_main_says_which_config_is_missing(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                           capsys: pytest.CaptureFixture[str]) -> None:
    monkeypatch.delenv("SANDBOX_CONFIG", raising=False)
    assert main([]) == 2
    assert "--config server.toml" in capsys.readouterr().err
    assert main(["--config", str(tmp_path / "nope.toml")]) == 2
    assert "no config file" in capsys.readouterr().err
