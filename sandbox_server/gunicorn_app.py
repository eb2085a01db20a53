"""The web tier: gunicorn serving the API, its settings computed in code from the server's config.

    python -m sandbox_server.gunicorn_app --config server.toml     # what `interp-sandbox serve` starts
    GunicornApp(ServerConfig.load("server.toml")).run()             # the same in this process; exits on SIGTERM
    gunicorn_settings(config)["timeout"]                            # 60: [jobs] max_wait_s + 30

The settings live in the package, not in a file beside it, so that a wheel install serves exactly as a
source checkout does, from any working directory. ``GunicornApp`` is a gunicorn ``BaseApplication``: it
reads no command line, no ``$GUNICORN_CMD_ARGS`` and no ``./gunicorn.conf.py`` of the current folder, so
nothing outside the server's TOML changes how it serves. Importing this module imports gunicorn and the
config only: the master never imports torch (the Flask app, and with it torch, is built in each web worker
after the fork). To run plain ``gunicorn`` with extra flags, use ``infra/gunicorn.conf.py`` (the same
settings).
"""
from __future__ import annotations

import argparse
import os
import sys
from collections.abc import Sequence
from typing import Any

from gunicorn.app.base import BaseApplication

from .config import ConfigError, ServerConfig
from .logs import configure_logging, gunicorn_logger_class

CONFIG_ENV = "SANDBOX_CONFIG"
EXIT_ERROR = 2


def gunicorn_settings(config: ServerConfig) -> dict[str, Any]:
    """gunicorn's settings (its names, as in a gunicorn config file) for serving ``config``'s API.

        gunicorn_settings(ServerConfig(port=8001))["bind"]      # "127.0.0.1:8001"

    Threads, not processes, carry most concurrency: a request mostly waits (on SQLite, on a job with
    ?wait=), and the meta-device model copies used for dry runs are per process. No preload: each web
    worker process opens its own database connections after the fork.
    """
    return {
        "bind": f"{config.host}:{config.port}",
        "worker_class": "gthread",
        "workers": config.web_workers,
        "threads": config.web_threads,
        # a request may block up to max_wait_s on GET /v1/jobs/<id>?wait=; leave room above it
        "timeout": int(config.jobs.max_wait_s) + 30,
        "graceful_timeout": 10,
        "keepalive": 5,             # the client's pool drops idle connections before this (sandbox_client.remote.api)
        "preload_app": False,
        "accesslog": "-",           # stdout of gunicorn, which the supervisor passes through
        "errorlog": "-",
        "loglevel": config.logging.level.lower(),    # [logging] level; the app's own records follow it too
        "proc_name": "interp-sandbox web",   # ps: "gunicorn: master [interp-sandbox web]"
        # request size is bounded by the app (max_request_mb); these bound headers
        "limit_request_line": 8190,
        "limit_request_fields": 100,
        # gunicorn >= 24 opens a control socket under $HOME by default: one path shared by every server of this
        # user (two servers on one host would fight over it) and a management door we do not use
        "control_socket_disable": True,
        # gunicorn's error and access lines in [logging] format too, so a JSON stream stays all JSON
        **({"logger_class": gunicorn_logger_class(config.logging)} if config.logging.format == "json" else {}),
    }


class GunicornApp(BaseApplication):
    """gunicorn's master over the API of ``config``; ``run()`` serves until SIGTERM/SIGINT, then exits.

        GunicornApp(ServerConfig.load("server.toml")).run()
    """

    def __init__(self, config: ServerConfig) -> None:
        self.config = config
        super().__init__()

    def load_config(self) -> None:
        for name, value in gunicorn_settings(self.config).items():
            if name in self.cfg.settings:    # a setting this gunicorn predates (control_socket_disable < 24)
                self.cfg.set(name, value)

    def load(self) -> Any:
        """The Flask app, built in each web worker process after it forked (torch is imported here)."""
        from .app import create_app

        configure_logging(self.config.logging)     # before the app: Flask then adds no handler of its own
        return create_app(self.config, warm=True)


def main(argv: Sequence[str] | None = None) -> int:
    """``python -m sandbox_server.gunicorn_app --config server.toml``: serve the API alone until SIGTERM."""
    parser = argparse.ArgumentParser(prog="python -m sandbox_server.gunicorn_app",
                                     description="Serve the interp-sandbox API under gunicorn (the web tier alone: "
                                     "`interp-sandbox serve` starts this and the model workers).")
    parser.add_argument("--config", default=os.environ.get(CONFIG_ENV),
                        help=f"the server's TOML config (default: ${CONFIG_ENV})")
    args = parser.parse_args(argv)
    if not args.config:
        print(f"{parser.prog}: error: say which server: --config server.toml (or ${CONFIG_ENV})", file=sys.stderr)
        return EXIT_ERROR
    try:
        config = ServerConfig.load(args.config)
    except ConfigError as err:
        print(f"{parser.prog}: error: {err}", file=sys.stderr)
        return EXIT_ERROR
    GunicornApp(config).run()
    return 0


if __name__ == "__main__":
    sys.exit(main())
