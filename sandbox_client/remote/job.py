"""A job on the server: follow it, cancel it, and fetch its verified results.

    tracer = model.trace("Hello", blocking=False)
    with tracer:
        h = model.model.layers[0].output.save()
    tracer.job.status()          # 'QUEUED', 'RUNNING', 'COMPLETED', ...
    tracer.job.wait()            # {node id: value}; h.value waits too
    tracer.job.cancel()

Following uses the server's long poll (``GET /v1/jobs/<id>?wait=S`` answers as soon as the job is
terminal), so nothing sleeps on the client. A blocking trace already waits in its submission
(``POST /v1/jobs?wait=S&inline=1``), and a result up to the server's ``inline_result_bytes`` comes inside
that answer: a short experiment is one request. Status lines go to stderr unless ``verbose=False``.
"""
from __future__ import annotations

import binascii
import importlib
import sys
import threading
import time
from collections.abc import Callable, Mapping
from typing import Any
from urllib.parse import quote

from ..errors import JobCancelled, JobError, JobTimeoutError, RemoteError, remote_error
from .api import READ_TIMEOUT, ApiClient
from .results import verified_values

TERMINAL = frozenset({"COMPLETED", "ERROR", "CANCELLED"})
LONG_POLL_S = 25.0          # the server allows up to 30 s per wait
STATUS_POLL_S = 2.0         # shorter long polls while status lines are shown, so "running" appears
PROGRESS_BYTES = 1 << 20    # a tqdm bar for results over 1 MB


class RemoteJob:
    """One submitted graph. ``info`` is the last Job dict the server sent."""

    def __init__(self, api: ApiClient, info: Mapping[str, Any], public_key: Callable[[], str],
                 verbose: bool = True) -> None:
        self.id = str(info["id"])
        self._path = f"/v1/jobs/{quote(self.id, safe='')}"
        self.info: dict[str, Any] = dict(info)
        self._api = api
        self._public_key = public_key
        self._verbose = verbose
        self._values: dict[int, Any] | None = None
        self._lock = threading.Lock()
        self._said = ""

    def __repr__(self) -> str:
        return f"RemoteJob({self.id!r}, {self.info.get('status')})"

    def refresh(self, wait: float = 0.0, inline: bool = False) -> dict[str, Any]:
        """The Job dict from the server; ``wait`` > 0 blocks until the job is terminal or ``wait`` s passed;
        ``inline`` asks for a small result's bytes inside it (``result["data"]``, base64)."""
        params = {"wait": f"{wait:.3f}"} if wait > 0 else {}
        if inline:
            params["inline"] = "1"
        self.info = dict(self._api.get_json(self._path, params or None, read_timeout=wait + READ_TIMEOUT))
        return self.info

    def status(self) -> str:
        """The job's current status: QUEUED, RUNNING, COMPLETED, ERROR or CANCELLED."""
        return str(self.refresh().get("status"))

    def done(self) -> bool:
        return str(self.info.get("status")) in TERMINAL or self.status() in TERMINAL

    def cancel(self) -> dict[str, Any]:
        """Ask the server to cancel; a queued job is cancelled at once, a running one within ~0.1 s."""
        try:
            self.info = dict(self._api.delete_json(self._path))
        except RemoteError as err:
            if err.code != "already_finished":
                raise
            self.refresh()
        return self.info

    def wait(self, timeout: float | None = None) -> dict[int, Any]:
        """Block until the job ends; return its verified values, ``{node id: value}``.

        Raises JobError (the job failed: ``source`` is your line at fault), JobCancelled,
        JobTimeoutError (``timeout`` seconds passed; the job goes on), ResultVerificationError.
        """
        with self._lock:
            if self._values is None:
                self._follow(timeout)
                self._values = self._download()
            return self._values

    # ----- internals -------------------------------------------------------------------------
    def _follow(self, timeout: float | None) -> None:
        deadline = None if timeout is None else time.monotonic() + timeout
        while True:
            status = str(self.info.get("status"))
            self._say_status(status)
            if status in TERMINAL:
                break
            poll = first_wait(self._verbose)
            left = poll if deadline is None else min(poll, deadline - time.monotonic())
            if left <= 0:
                raise JobTimeoutError("timeout", f"job {self.id} is still {status} after {timeout} s; call "
                                      "job.wait() again, or job.cancel()")
            self.refresh(wait=left, inline=True)
        if status == "ERROR":
            raise job_error(self.info)
        if status == "CANCELLED":
            raise JobCancelled("cancelled", f"job {self.id} was cancelled, so it has no results")

    def _download(self) -> dict[int, Any]:
        result = self.info.get("result")
        if not isinstance(result, dict) or not result.get("url"):
            expired = self.info.get("result_expired")
            raise RemoteError("result_expired" if expired else "no_result",
                              f"job {self.id} has no downloadable result"
                              + ("; results expire after a while: run the trace again" if expired else ""))
        inline = _inline_bytes(result.pop("data", None))    # not kept in ``info``: the values are returned
        if inline is not None:
            return verified_values(self.id, inline, result, self._public_key())
        size = int(result.get("size") or 0)
        self._say("downloading" + (f" {size / 1e6:.1f} MB" if size >= PROGRESS_BYTES else ""))
        if self._verbose and size >= PROGRESS_BYTES:
            data = self._download_with_bar(str(result["url"]), size)
        else:
            data = self._api.download(str(result["url"]))
        return verified_values(self.id, data, result, self._public_key())

    def _download_with_bar(self, url: str, size: int) -> bytes:
        tqdm = importlib.import_module("tqdm").tqdm   # by name: tqdm ships no type stubs

        with tqdm(total=size, unit="B", unit_scale=True, file=sys.stderr, leave=False) as bar:
            return self._api.download(url, progress=lambda n, total: bar.update(n))

    def _say_status(self, status: str) -> None:
        if status == "QUEUED":
            self._say(f"queued at position {self.info.get('position', '?')}")
        elif status == "RUNNING":
            self._say("running")

    def _say(self, line: str) -> None:
        if self._verbose and line != self._said:
            self._said = line
            print(f"interp-sandbox: job {self.id}: {line}", file=sys.stderr, flush=True)


def first_wait(verbose: bool) -> float:
    """How long one request waits for a job to end: short while status lines are shown."""
    return STATUS_POLL_S if verbose else LONG_POLL_S


def _inline_bytes(data: Any) -> bytes | None:
    """A result's inline bytes (base64 text); None when absent or not base64 (then the URL is downloaded).
    What they hold is checked like a download: sha256 and signature, before anything is decoded."""
    if not isinstance(data, str):
        return None
    try:
        return binascii.a2b_base64(data, strict_mode=True)   # b64decode(validate=True) checks with a slow regex
    except (binascii.Error, ValueError):
        return None


def job_error(info: Mapping[str, Any]) -> RemoteError:
    """The JobError of a job that ended ERROR, with the server's code, message, node and source line
    (also an ``InterventionError`` when the code is "intervention", as a local run would raise)."""
    raw = info.get("error")
    error: Mapping[str, Any] = raw if isinstance(raw, dict) else {}
    node = error.get("node")
    return remote_error(JobError, str(error.get("code") or "job_failed"),
                        str(error.get("message") or f"job {info.get('id')} failed on the server without a message"),
                        source=str(error.get("source") or ""), node=node if isinstance(node, int) else None)
