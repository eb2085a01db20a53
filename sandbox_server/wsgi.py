"""The WSGI entry point for a WSGI server of your own: ``sandbox_server.wsgi:app`` with ``SANDBOX_CONFIG``.

    SANDBOX_CONFIG=server.toml gunicorn -c infra/gunicorn.conf.py sandbox_server.wsgi:app

``interp-sandbox serve`` does not go through this module: its web tier is ``sandbox_server.gunicorn_app``,
which builds the same app from the config it was given. Importing this module is cheap: the app (database,
store, torch and the model catalog) is built on first access to ``app``, in each worker process after it forked,
after logging is set up from ``[logging]`` (``sandbox_server.logs``).
"""
from __future__ import annotations

import os
import threading
from typing import Any

CONFIG_ENV = "SANDBOX_CONFIG"
_lock = threading.Lock()
_app: Any = None


def load_app() -> Any:
    """The Flask app for the config file named by ``$SANDBOX_CONFIG`` (built once per process)."""
    global _app
    with _lock:
        if _app is None:
            from .app import create_app
            from .config import ServerConfig
            from .logs import configure_logging

            path = os.environ.get(CONFIG_ENV)
            if not path:
                raise RuntimeError(f"set {CONFIG_ENV} to the server's TOML config file before starting gunicorn")
            config = ServerConfig.load(path)
            configure_logging(config.logging)     # before the app: Flask then adds no handler of its own
            _app = create_app(config, warm=True)
        return _app


def __getattr__(name: str) -> Any:
    if name == "app":
        return load_app()
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
