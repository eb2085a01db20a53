"""The server's log lines: set up once per process from ``[logging]``, as text for people or JSON for collectors.

    configure_logging(config.logging)          # first thing in each entry point: serve, the worker's main, wsgi
    log = logging.getLogger(__name__)          # in every module; library code never configures logging
    log.info("worker %s ready", name, extra={"model": name})

Every server process (supervisor, model workers, gunicorn and its web workers) writes to its stderr,
which the supervisor's children share. ``format = "text"``::

    2025-05-01 12:00:00,123 INFO sandbox_server.worker[4242]: worker tiny-gpt2 (pid 4242) ready in 0.41 s

``format = "json"``, one object per line, with any ``extra`` fields of the call::

    {"time": "2025-05-01T12:00:00.123Z", "level": "INFO", "logger": "sandbox_server.worker", "pid": 4242,
     "message": "worker tiny-gpt2 (pid 4242) ready in 0.41 s", "model": "tiny-gpt2"}

gunicorn's own error and access lines take the same format through ``gunicorn_logger_class`` (named
by ``sandbox_server.gunicorn_app``).
"""
from __future__ import annotations

import json
import logging
import sys
import time
from typing import IO, Any

from .config import LoggingConfig

TEXT_FORMAT = "%(asctime)s %(levelname)s %(name)s[%(process)d]: %(message)s"
# what every LogRecord has; anything else on a record came from ``extra=`` and goes into the JSON object
_STANDARD = frozenset(vars(logging.LogRecord("", 0, "", 0, "", (), None))) | {"message", "asctime", "taskName"}


class JsonFormatter(logging.Formatter):
    """One JSON object per record: time (UTC, ISO 8601, ms), level, logger, pid, message, the call's extras,
    and ``exception`` (the formatted traceback) when there is one."""

    def format(self, record: logging.LogRecord) -> str:
        stamp = time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(record.created))
        line: dict[str, Any] = {"time": f"{stamp}.{int(record.msecs):03d}Z", "level": record.levelname,
                                "logger": record.name, "pid": record.process, "message": record.getMessage()}
        for key, value in vars(record).items():
            if key not in _STANDARD and key not in line:
                line[key] = value
        if record.exc_info:
            line["exception"] = self.formatException(record.exc_info)
        if record.stack_info:
            line["stack"] = self.formatStack(record.stack_info)
        return json.dumps(line, default=str)


def formatter(config: LoggingConfig) -> logging.Formatter:
    """The formatter ``config.format`` names."""
    return JsonFormatter() if config.format == "json" else logging.Formatter(TEXT_FORMAT)


def configure_logging(config: LoggingConfig, stream: IO[str] | None = None) -> None:
    """Send this process's log records at ``config.level`` and above to ``stream`` (stderr) in ``config.format``.

    Called by the server's entry points only. Calling it again replaces the handler it installed before and
    leaves other handlers of the root logger alone (pytest's, for instance). Python warnings are logged
    (``py.warnings``) instead of printed.
    """
    root = logging.getLogger()
    for handler in [h for h in root.handlers if getattr(h, "_sandbox", False)]:
        root.removeHandler(handler)
    handler = logging.StreamHandler(stream if stream is not None else sys.stderr)
    handler.setFormatter(formatter(config))
    handler._sandbox = True  # type: ignore[attr-defined]
    root.addHandler(handler)
    root.setLevel(config.level)
    logging.captureWarnings(True)       # Python warnings become records too: a JSON stream stays all JSON


def gunicorn_logger_class(config: LoggingConfig) -> type:
    """gunicorn's ``logger_class`` whose error and access lines use ``config.format`` (gunicorn formats them
    itself otherwise); named by ``sandbox_server.gunicorn_app.gunicorn_settings``."""
    from gunicorn.glogging import Logger

    class SandboxGunicornLogger(Logger):
        def setup(self, cfg: Any) -> None:
            super().setup(cfg)
            for log in (self.error_log, self.access_log):
                for handler in log.handlers:
                    handler.setFormatter(formatter(config))

    return SandboxGunicornLogger
