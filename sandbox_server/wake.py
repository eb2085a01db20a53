"""The wake-up signal between the web tier and a model worker: one Unix datagram per queued job.

    sock = bind_wake_socket(config.wake_socket("tiny-gpt2"))   # in the worker
    send_wake(config.wake_socket("tiny-gpt2"))                 # in the web tier, after queueing a job
    wait_for_wake(sock, 0.2)                                   # True if woken, False on timeout

Best effort by design: the worker also polls the database, so a lost datagram only costs latency.
Paths past AF_UNIX's 107-byte limit are reached through ``/proc/self/fd/<folder fd>/<name>``.
"""
from __future__ import annotations

import os
import select
import socket
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

WAKE_MESSAGE = b"job"


def bind_wake_socket(path: Path) -> socket.socket:
    """Bind the worker's datagram socket at ``path`` (its folder made 0700, a stale socket replaced)."""
    path.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
    path.parent.chmod(0o700)
    path.unlink(missing_ok=True)    # a stale socket of a worker that died
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    sock.setblocking(False)
    with socket_address(path) as address:
        sock.bind(address)
    return sock


def send_wake(path: Path) -> None:
    """One datagram to the worker at ``path``; silently nothing when no worker listens (yet)."""
    try:
        with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as sock, socket_address(path) as address:
            sock.setblocking(False)
            sock.sendto(WAKE_MESSAGE, address)
    except OSError:
        pass


@contextmanager
def socket_address(path: Path) -> Iterator[str]:
    """``path`` as an AF_UNIX address, valid inside the block (a long path goes through a folder fd)."""
    text = str(path)
    if len(text.encode()) < 100:
        yield text
        return
    fd = os.open(path.parent, os.O_RDONLY | os.O_DIRECTORY)
    try:
        yield f"/proc/self/fd/{fd}/{path.name}"
    finally:
        os.close(fd)


def wait_for_wake(sock: socket.socket, timeout: float) -> bool:
    """Sleep until a datagram arrives or ``timeout`` passes; drain every queued datagram. True if woken."""
    try:
        ready, _, _ = select.select([sock], [], [], timeout)
    except InterruptedError:  # a signal: the caller re-checks whether to stop
        return False
    woke = False
    while ready:
        try:
            sock.recv(64)
            woke = True
        except (BlockingIOError, InterruptedError):
            break
    return woke
