"""One pre-loaded parent for the server's heavy processes: torch, transformers, the interpreter and
the web stack are imported once, and each model worker and the web tier (gunicorn, whose workers
fork in turn) is forked from it. Their read-only pages (torch's and transformers' code and module
objects) then sit in RAM once instead of once per process: about 200 MB less for a small model.

    zygote = Zygote.start(env)                                  # in the supervisor (a child subreaper)
    proc = zygote.spawn("worker", ["--config", "server.toml", "--model", "tiny-gpt2"])
    proc.pid, proc.poll(), proc.wait(5.0)                       # like subprocess.Popen
    zygote.close()                                              # the forked processes live on

How: the supervisor marks itself a child subreaper (Linux ``PR_SET_CHILD_SUBREAPER``) and starts
``python -P -m sandbox_server.zygote --fd N``, which imports ``PRELOAD``, freezes the garbage
collector's view of those objects (so collections do not write to the shared pages), and answers
spawn requests on the socket: it forks twice, the middle process exits at once, and the new process
is re-parented to the supervisor, which waits for it like any child. The new process gets its own
process group, stdin from /dev/null, default signal handlers and a process title, then runs one of
two fixed entry points (``ENTRIES``): the zygote runs nothing else. The zygote holds no database
connection, no thread and no request data, so a fork copies nothing private.

The supervisor closes the zygote once the first generation runs (kept, it would hold the originals
of every page its children have written since: about 65 MB); restarted processes exec on their own.
Trade-off: the forked processes share the zygote's address-space layout (as Android's zygote does);
``[server] shared_imports = false`` starts each process with its own exec instead.
"""
from __future__ import annotations

import argparse
import atexit
import ctypes
import gc
import importlib
import json
import logging
import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Callable, Iterator, Mapping
from typing import Any

PRELOAD = (
    "torch", "transformers", "tokenizers", "safetensors.torch",
    "transformers.models.llama.modeling_llama", "transformers.models.gpt2.modeling_gpt2",
    "transformers.models.qwen2.modeling_qwen2", "transformers.generation",
    "sandbox_client.language_model", "sandbox_client.interpreter.runner", "validator.check",
    "sandbox_client.interpreter.preflight",
    "storage.bundle", "sandbox_server.worker", "sandbox_server.cobatch", "sandbox_server.models",
    "sandbox_server.app", "sandbox_server.gunicorn_app", "flask", "gunicorn.workers.gthread",
)
START_TIMEOUT_S = 180.0
SPAWN_TIMEOUT_S = 30.0
_PR_SET_CHILD_SUBREAPER = 36


class ZygoteError(Exception):
    """The zygote could not be started or did not answer: spawn the process with its own exec instead."""


# ----- the supervisor's side ---------------------------------------------------------------------
class ForkedProcess:
    """A process the zygote forked and the supervisor adopted: the subset of ``subprocess.Popen`` it uses."""

    def __init__(self, pid: int) -> None:
        self.pid = pid
        self.returncode: int | None = None

    def poll(self) -> int | None:
        if self.returncode is None:
            try:
                pid, status = os.waitpid(self.pid, os.WNOHANG)
            except ChildProcessError:          # reaped elsewhere: report it as gone
                self.returncode = -int(signal.SIGKILL)
            else:
                if pid:
                    self.returncode = os.waitstatus_to_exitcode(status)
        return self.returncode

    def wait(self, timeout: float | None = None) -> int:
        deadline = None if timeout is None else time.monotonic() + timeout
        while (code := self.poll()) is None:
            if deadline is not None and time.monotonic() >= deadline:
                raise subprocess.TimeoutExpired(f"pid {self.pid}", timeout or 0.0)
            time.sleep(0.01)
        return code


class Zygote:
    """The supervisor's handle on the zygote process."""

    def __init__(self, proc: subprocess.Popen[bytes], sock: socket.socket) -> None:
        self.proc, self._sock, self._buffer = proc, sock, b""

    @classmethod
    def start(cls, env: Mapping[str, str], timeout: float = START_TIMEOUT_S) -> Zygote:
        """Start the zygote and wait until it has imported ``PRELOAD``; ZygoteError if that fails."""
        become_subreaper()
        ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
        try:
            # -P: the installed packages, never a same-named folder in the working directory (as for every child)
            command = [sys.executable, "-P", "-m", "sandbox_server.zygote", "--fd", str(theirs.fileno())]
            proc = subprocess.Popen(command, env=dict(env), stdin=subprocess.DEVNULL, pass_fds=[theirs.fileno()])
        except OSError as err:
            ours.close()
            raise ZygoteError(f"cannot start the zygote: {err}") from None
        finally:
            theirs.close()
        zygote = cls(proc, ours)
        try:
            zygote._reply(timeout)
        except ZygoteError:
            zygote.close()
            raise
        return zygote

    def spawn(self, kind: str, args: list[str]) -> ForkedProcess:
        """Fork a process running entry point ``kind`` with ``args``; it is this process's child."""
        try:
            self._sock.sendall(json.dumps({"kind": kind, "args": args}).encode() + b"\n")
        except OSError as err:
            raise ZygoteError(f"the zygote is gone ({err})") from None
        return ForkedProcess(int(self._reply(SPAWN_TIMEOUT_S)["pid"]))

    def close(self) -> None:
        """Stop the zygote (its forked processes live on)."""
        self._sock.close()
        try:
            self.proc.wait(10)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()

    def _reply(self, timeout: float) -> dict[str, Any]:
        self._sock.settimeout(timeout)
        try:
            while b"\n" not in self._buffer:
                chunk = self._sock.recv(4096)
                if not chunk:
                    raise ZygoteError(f"the zygote exited (code {self.proc.poll()})")
                self._buffer += chunk
        except TimeoutError:
            raise ZygoteError(f"the zygote did not answer within {timeout:g} s") from None
        except OSError as err:
            raise ZygoteError(f"the zygote is gone ({err})") from None
        line, self._buffer = self._buffer.split(b"\n", 1)
        reply = json.loads(line)
        if "error" in reply:
            raise ZygoteError(str(reply["error"]))
        return dict(reply)


def become_subreaper() -> None:
    """Orphaned descendants of this process become its children (Linux only); ZygoteError elsewhere."""
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        if libc.prctl(_PR_SET_CHILD_SUBREAPER, 1, 0, 0, 0) != 0:
            raise OSError(ctypes.get_errno(), os.strerror(ctypes.get_errno()))
    except (OSError, AttributeError) as err:
        raise ZygoteError(f"cannot adopt forked processes here (prctl: {err})") from None


# ----- the zygote's side -------------------------------------------------------------------------
def _run_worker(args: list[str]) -> int:
    from sandbox_server.worker import main

    return main(args)


def _run_web(args: list[str]) -> int:
    from sandbox_server.gunicorn_app import main

    return main(args)


ENTRIES: dict[str, Callable[[list[str]], int]] = {"worker": _run_worker, "web": _run_web}


def preload() -> list[str]:
    """Import ``PRELOAD`` (skipping what is not installed) and freeze it out of garbage collection."""
    missing = []
    for name in PRELOAD:
        try:
            importlib.import_module(name)
        except ImportError:
            missing.append(name)
    gc.collect()
    gc.freeze()
    return missing


def serve(sock: socket.socket) -> None:
    """Answer spawn requests until the supervisor closes the socket."""
    for line in _lines(sock):
        try:
            request = json.loads(line)
            kind, args = request["kind"], [str(a) for a in request["args"]]
            if kind not in ENTRIES:
                raise ValueError(f"unknown entry point {kind!r}")
            pid = _fork(kind, args, sock)
        except (ValueError, KeyError, TypeError, OSError) as err:
            sock.sendall(json.dumps({"error": f"{type(err).__name__}: {err}"}).encode() + b"\n")
            continue
        sock.sendall(json.dumps({"pid": pid}).encode() + b"\n")


def _lines(sock: socket.socket) -> Iterator[bytes]:
    buffer = b""
    while chunk := sock.recv(4096):
        buffer += chunk
        while b"\n" in buffer:
            line, buffer = buffer.split(b"\n", 1)
            yield line


def _fork(kind: str, args: list[str], sock: socket.socket) -> int:
    """Fork twice; the grandchild runs the entry point and is re-parented to the supervisor."""
    read_end, write_end = os.pipe()
    middle = os.fork()
    if middle == 0:
        os.close(read_end)
        try:
            child = os.fork()
        except OSError:
            os._exit(1)
        if child == 0:
            os.close(write_end)
            _become(kind, args, sock)
        try:
            os.write(write_end, str(child).encode())
        finally:
            os._exit(0)
    os.close(write_end)
    with os.fdopen(read_end, "rb") as f:
        data = f.read()
    os.waitpid(middle, 0)
    if not data:
        raise OSError("fork failed in the zygote")
    return int(data)


def _become(kind: str, args: list[str], sock: socket.socket) -> None:
    """In the new process: a fresh group and defaults, run the entry point, exit with its code. Never returns."""
    code = 1
    try:
        os.close(sock.detach())            # the spawn socket is the zygote's alone
        os.setpgid(0, 0)
        signal.signal(signal.SIGINT, signal.default_int_handler)
        signal.signal(signal.SIGTERM, signal.SIG_DFL)
        _set_title(f"interp-sandbox {kind} {' '.join(args)}")
        code = ENTRIES[kind](args) or 0
    except SystemExit as exc:              # gunicorn's master and workers end this way
        code = exc.code if isinstance(exc.code, int) else (0 if exc.code is None else 1)
    except BaseException:
        logging.getLogger("sandbox_server.zygote").exception("the %s entry point failed (args %s)", kind, args)
    finally:
        atexit._run_exitfuncs()
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(code)


def _set_title(title: str) -> None:
    try:
        from setproctitle import setproctitle
    except ImportError:
        return
    setproctitle(title)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m sandbox_server.zygote", description=__doc__.split("\n")[0])
    parser.add_argument("--fd", type=int, required=True, help="the supervisor's end of the spawn socket")
    args = parser.parse_args(argv)
    signal.signal(signal.SIGINT, signal.SIG_IGN)     # Ctrl-C is the supervisor's to handle; EOF stops us
    sock = socket.socket(fileno=args.fd)
    _set_title("interp-sandbox zygote")
    missing = preload()
    sock.sendall(json.dumps({"ready": True, "missing": missing}).encode() + b"\n")
    serve(sock)
    os._exit(0)     # nothing to clean up: skip tearing down torch, so the supervisor's close() returns at once


if __name__ == "__main__":
    sys.exit(main())
