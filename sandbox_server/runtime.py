"""The run-time guard of one job: wall-clock limit, cancellation, memory cap, result size, error reports.

    guard = JobGuard(db.cancels_requested)              # once per worker process (starts its watcher thread)
    cap_address_space(config.jobs.worker_memory_mb)    # after the model is loaded
    try:
        with guard.watch(job.id, timeout_s=60.0):
            results = runner.run(graph)
    except BaseException as exc:
        error = describe_error(exc, timeout_s=60.0)    # a JobError: code, message, node, source

While a job runs, a global forward pre-hook checks before every module call whether the deadline has
passed or the job's owner asked to cancel it (a watcher thread polls the database every ~50 ms) and
then raises ``JobAborted``, which unwinds the forward, the generation and the interpreter, whose
hooks and gradients are restored on the way out. ``JobAborted`` is a ``BaseException`` so that no
``except Exception`` between the hook and the worker turns it into an ordinary node error.

What a module pre-hook cannot stop, a single long Python expression in a user function or one huge
tensor operation, the supervisor stops: it kills the worker ``kill_grace_s`` after the deadline.
"""
from __future__ import annotations

import contextlib
import ctypes
import resource
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from typing import Any

import torch
from torch import nn
from torch.nn.modules.module import register_module_forward_pre_hook

from sandbox_client.errors import SandboxError
from validator import ValidationError

from .types import JobError

POLL_S = 0.05
_MEMORY_WORDS = ("can't allocate memory", "not enough memory", "out of memory", "cannot allocate memory")


class JobAborted(BaseException):
    """The job passed its wall-clock limit (``reason`` "timeout") or its owner cancelled it ("cancelled")."""

    def __init__(self, reason: str) -> None:
        self.reason = reason
        super().__init__(f"job aborted: {reason}")


class JobFailure(Exception):
    """A job failed in the worker's own steps (result size, storage); ``code`` is the API error code."""

    def __init__(self, code: str, message: str) -> None:
        self.code = code
        self.message = message
        super().__init__(message)


class JobGuard:
    """Stops the running job at its deadline or on cancel, from inside the model's forward.

    ``cancels_requested(job_ids)`` (which of them to cancel) is polled from a daemon thread every ``poll_s``
    seconds while a job runs.
    The thread is started here, once, so that no thread has to be created after a memory cap is set.
    """

    def __init__(self, cancels_requested: Callable[[Sequence[str]], list[str]], poll_s: float = POLL_S) -> None:
        self._cancels_requested = cancels_requested
        self._poll_s = poll_s
        self._job: str | None = None
        self._jobs: tuple[str, ...] = ()
        self.cancelled: list[str] = []     # the watched jobs whose owners asked to cancel (a co-batch has several)
        self._deadline = float("inf")
        self._abort: str | None = None
        self._wake = threading.Condition()
        threading.Thread(target=self._watch_loop, name="job-guard", daemon=True).start()

    @property
    def aborted(self) -> str | None:
        """The reason the current job is being stopped ("timeout" / "cancelled"), else None."""
        if self._abort is None and self._job is not None and time.monotonic() > self._deadline:
            self._abort = "timeout"
        return self._abort

    @contextlib.contextmanager
    def watch(self, job_id: str | Sequence[str], timeout_s: float) -> Iterator[JobGuard]:
        """Guard one job (or the jobs of one co-batch, stopped together when any is cancelled): raises
        ``JobAborted`` inside module calls once the job must stop; ``cancelled`` then names who cancelled."""
        jobs = (job_id,) if isinstance(job_id, str) else tuple(job_id)
        with self._wake:
            self._job, self._jobs, self._abort, self.cancelled = jobs[0], jobs, None, []
            self._deadline = time.monotonic() + timeout_s
            self._wake.notify()
        handle = register_module_forward_pre_hook(self._pre_hook)
        try:
            yield self
        finally:
            handle.remove()
            with self._wake:
                self._job, self._deadline = None, float("inf")

    def check(self) -> None:
        """Raise ``JobAborted`` if the job must stop (for steps outside the model's forward)."""
        reason = self.aborted
        if reason is not None:
            raise JobAborted(reason)

    def _pre_hook(self, module: nn.Module, args: Any) -> None:
        self.check()

    def _watch_loop(self) -> None:
        while True:
            with self._wake:
                while self._job is None:
                    self._wake.wait()
                jobs = self._jobs
            time.sleep(self._poll_s)
            try:
                cancelled = self._cancels_requested(jobs)
            except Exception:  # a busy or briefly locked database: try again at the next poll
                continue
            with self._wake:
                if cancelled and self._jobs == jobs and self._abort is None:
                    self.cancelled = cancelled
                    self._abort = "cancelled"


M_TRIM_THRESHOLD = -1           # glibc <malloc.h>
M_MMAP_THRESHOLD = -3


def release_free_memory() -> bool:
    """Hand the C heap's free pages back to the system (glibc ``malloc_trim``); False where there is none.

    Loading a model frees a lot (conversion buffers, the shape probes) that malloc would otherwise keep
    for the process's whole life: about 30 MB for SmolLM2-135M.
    """
    libc = _glibc()
    return libc is not None and bool(libc.malloc_trim(0))


def keep_freed_memory(limit_mb: int) -> bool:
    """Let the C heap keep up to ``limit_mb`` MiB of freed memory for reuse (glibc ``mallopt``); False where
    there is no glibc or ``limit_mb`` is 0.

        keep_freed_memory(512)      # after the model is loaded and release_free_memory() has run

    By default glibc serves each allocation over 32 MiB with a fresh ``mmap`` and unmaps it when freed, so
    every forward of a large batch faults its biggest activations (the logits: 16 rows x 16 tokens x
    49,152 x 4 bytes = 50 MB for SmolLM2) in page by page again, zeroed by the kernel: 49,000 page faults
    and 0.18 s of system time in a 0.8 s forward. With both thresholds at ``limit_mb``, blocks up to that
    size come from the heap and stay there once freed, so the next forward reuses them; the process keeps
    its high-water mark, at most about ``limit_mb`` above what it holds.
    """
    if limit_mb <= 0:
        return False
    size = min(limit_mb * 2**20, 2**31 - 1)    # mallopt takes a C int
    libc = _glibc()
    return libc is not None and bool(libc.mallopt(M_MMAP_THRESHOLD, size)) \
        and bool(libc.mallopt(M_TRIM_THRESHOLD, size))


def _glibc() -> ctypes.CDLL | None:
    """The C library when it is glibc (it has ``malloc_trim`` and ``mallopt``), else None (musl, macOS)."""
    try:
        libc = ctypes.CDLL("libc.so.6")
    except OSError:
        return None
    return libc if hasattr(libc, "malloc_trim") and hasattr(libc, "mallopt") else None


def cap_address_space(extra_mb: int) -> int | None:
    """Limit this process's address space to its current size + ``extra_mb`` MiB (RLIMIT_AS); None if 0.

    Called after the model is loaded, so the cap bounds what a job may allocate on top of the model:
    a bigger allocation fails as MemoryError / a torch RuntimeError and the job ends "memory_limit"
    while the process lives on.
    """
    size = _virtual_size()
    if extra_mb <= 0 or size == 0:
        return None
    limit = size + extra_mb * 2**20
    _, hard = resource.getrlimit(resource.RLIMIT_AS)
    if hard != resource.RLIM_INFINITY:
        limit = min(limit, hard)
    resource.setrlimit(resource.RLIMIT_AS, (limit, hard))
    return limit


def check_result_size(size: int, limit: int) -> None:
    """Refuse a result bundle over ``limit`` bytes (the validator's estimate can miss generate lengths)."""
    if size > limit:
        raise JobFailure("result_too_large", f"the saved values encode to {size} bytes (limit {limit}); save "
                         "fewer or smaller values, e.g. slices like [:, -1] instead of whole tensors")


def describe_error(exc: BaseException, timeout_s: float, memory_mb: int = 0) -> JobError:
    """Why a job failed, as the API shows it (never a traceback)."""
    if isinstance(exc, ValidationError):
        return JobError(exc.code, exc.message, exc.node, exc.source)
    source = exc.source if isinstance(exc, SandboxError) else ""
    node = getattr(exc, "node", None)
    if isinstance(exc, JobAborted):
        return JobError("cancelled", "cancelled by its owner while it ran") if exc.reason == "cancelled" \
            else JobError("timeout", f"the job ran longer than its limit of {timeout_s:g} s and was stopped; shorten "
                        "it: fewer or shorter prompts, a smaller max_new_tokens, or split it into several jobs")
    if is_memory_error(exc):
        limit = f" ({memory_mb} MiB above the model)" if memory_mb else ""
        return JobError("memory_limit", f"the job needed more memory than a job may use{limit}; use fewer or shorter "
                      "prompts, smaller intermediate tensors, or split it into several jobs", node, source)
    if isinstance(exc, JobFailure):
        return JobError(exc.code, exc.message)
    if isinstance(exc, SandboxError):
        return JobError(exc.code, exc.message, node, source)
    return JobError("runtime", f"{type(exc).__name__}: {exc}", node, source)


def is_memory_error(exc: BaseException) -> bool:
    """Whether ``exc`` or an exception it was raised from is an allocation failure."""
    seen: set[int] = set()
    current: BaseException | None = exc
    while current is not None and id(current) not in seen:
        seen.add(id(current))
        if isinstance(current, (MemoryError, torch.OutOfMemoryError)):
            return True
        if isinstance(current, RuntimeError) and any(w in str(current).lower() for w in _MEMORY_WORDS):
            return True
        current = current.__cause__ or current.__context__
    return False


def _virtual_size() -> int:
    """This process's virtual memory size in bytes (Linux /proc; 0 elsewhere)."""
    try:
        with open("/proc/self/statm") as f:
            return int(f.read().split()[0]) * resource.getpagesize()
    except (OSError, ValueError, IndexError):
        return 0
