"""Job-end announcements: whoever ends a job tells every web process at once, so a long poll
(``GET /v1/jobs/<id>?wait=S``) answers the moment its job ends instead of querying the database
every few milliseconds.

    ends = JobEnds(config.web_socket_dir)          # one per web process (binds <dir>/<pid>.sock on first use)
    ends.wait_for("job_x", 0.5, still_running)     # sleeps until job_x is announced or 0.5 s pass
    announce(config.web_socket_dir, ["job_x"])     # a model worker after finish_job, the supervisor after
                                                   # fail_running, a web process after cancelling a queued job

One Unix datagram per announcement to every web process's socket, holding the ended jobs' ids
separated by spaces. Best effort by design: a waiter also re-reads the database every
``SAFETY_POLL_S``, so a lost datagram (a full socket buffer) costs latency, not correctness. A socket
whose process is gone refuses the datagram and is removed by the sender.
"""
from __future__ import annotations

import atexit
import os
import socket
import threading
from collections.abc import Callable, Iterable
from pathlib import Path

from .wake import socket_address

SAFETY_POLL_S = 0.5
_MAX_DATAGRAM = 60_000


def announce(folder: Path, job_ids: Iterable[str]) -> None:
    """Tell every web process listening in ``folder`` that ``job_ids`` ended; never raises."""
    chunks = _chunks(list(job_ids))
    if not chunks:
        return
    try:
        sockets = [p for p in folder.iterdir() if p.suffix == ".sock"]
    except OSError:             # no web process has listened yet
        return
    with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as sender:
        sender.setblocking(False)
        for path in sockets:
            for chunk in chunks:
                if not _send(sender, path, chunk):
                    break


def _chunks(job_ids: list[str]) -> list[bytes]:
    """The ids as space-separated datagrams of at most ``_MAX_DATAGRAM`` bytes, never splitting an id."""
    chunks, current = [], b""
    for job_id in job_ids:
        item = job_id.encode()[:_MAX_DATAGRAM]
        if current and len(current) + 1 + len(item) > _MAX_DATAGRAM:
            chunks.append(current)
            current = b""
        current = current + b" " + item if current else item
    return [*chunks, current] if current else chunks


def _send(sender: socket.socket, path: Path, chunk: bytes) -> bool:
    try:
        with socket_address(path) as address:
            sender.sendto(chunk, address)
        return True
    except ConnectionRefusedError:          # its process is gone: nobody will read this socket again
        path.unlink(missing_ok=True)
    except OSError:                         # a full buffer, or the socket vanished: the waiter polls anyway
        pass
    return False


class JobEnds:
    """The web process's listener: a daemon thread receives announcements and wakes the waiting requests."""

    def __init__(self, folder: Path) -> None:
        self.folder = folder
        self._lock = threading.Lock()
        self._waiting: dict[str, list[threading.Event]] = {}
        self._pid: int | None = None          # the process the listener runs in (gunicorn forks after import)
        self._sock: socket.socket | None = None

    def wait_for(self, job_id: str, timeout: float, still_running: Callable[[], bool]) -> None:
        """Return once ``job_id`` is announced, ``still_running()`` is False, or ``timeout`` passed.

        ``still_running`` (a database read) is called after registering, so an end announced between the
        caller's last read and this wait is not missed, and again every ``SAFETY_POLL_S``.
        """
        self._listen()
        event = threading.Event()
        with self._lock:
            self._waiting.setdefault(job_id, []).append(event)
        try:
            remaining = timeout
            while remaining > 0 and still_running():
                step = min(remaining, SAFETY_POLL_S)
                if event.wait(step):
                    return
                remaining -= step
        finally:
            with self._lock:
                events = self._waiting.get(job_id, [])
                if event in events:
                    events.remove(event)
                if not events:
                    self._waiting.pop(job_id, None)

    def _listen(self) -> None:
        if self._pid == os.getpid():
            return
        with self._lock:
            if self._pid == os.getpid():
                return
            self.folder.mkdir(mode=0o700, parents=True, exist_ok=True)
            path = self.folder / f"{os.getpid()}.sock"
            path.unlink(missing_ok=True)
            sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
            with socket_address(path) as address:
                sock.bind(address)
            self._sock, self._pid = sock, os.getpid()
            atexit.register(path.unlink, missing_ok=True)
            threading.Thread(target=self._receive, args=(sock,), name="job-ends", daemon=True).start()

    def _receive(self, sock: socket.socket) -> None:
        while True:
            try:
                data = sock.recv(_MAX_DATAGRAM + 1024)
            except InterruptedError:
                continue
            except OSError:
                return
            self._wake(data.decode(errors="replace").split())

    def _wake(self, job_ids: list[str]) -> None:
        with self._lock:
            events = [e for job_id in job_ids for e in self._waiting.get(job_id, ())]
        for event in events:
            event.set()
