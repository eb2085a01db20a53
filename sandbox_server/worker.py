"""One model worker process: loads one model, then runs that model's queued jobs (co-batched when they fit).

    python -m sandbox_server.worker --config server.toml --model tiny-gpt2     # the supervisor starts it

A job's path here: wake on a datagram at ``config.wake_socket(model)`` (or every 0.2 s), claim the
next jobs fairly (``db.claim_batch``, up to ``[batching] max_batch``; ``max_batch = 1`` claims one at a
time), validate each stored graph again (nothing unvalidated ever runs), run compatible jobs merged
into one forward (``cobatch``, ``run_batch``) and the others alone with the client's interpreter, under
the run-time guard (``runtime.JobGuard``: deadline and cancel), encode each job's saved values as its
own safetensors bundle, sign its SHA-256 together with the job id, put it in the result store under an
unguessable key, and record the outcome in the database.
Every failure ends the job ERROR with a ``JobError`` (code, message, node, source); the worker lives on.

SIGTERM (or SIGINT) lets the current job finish, then the worker exits. ``main`` sets up logging from
``[logging]`` (``sandbox_server.logs``); events are records of the ``sandbox_server.worker`` logger.
With the environment variable ``SANDBOX_TEST_PARAM_HASH=1`` the worker appends "<job id> <hash of
every weight, buffer, requires_grad flag and training flag>" to ``<data_dir>/test/param-hashes-<model>.txt``
after loading and after each job (tests read it to prove that no job changes the model).
"""
from __future__ import annotations

import argparse
import hashlib
import logging
import os
import secrets
import signal
import socket
import sys
import time
from typing import Any

import torch
from torch import nn

from sandbox_client.graph import Graph
from sandbox_client.interpreter import user_function_deadline
from storage import BundleError, ResultStore, Signer, StorageError, encode_results, result_message
from validator import ModelSpec, validate

from .cobatch import group_jobs, run_together
from .config import ModelConfig, ServerConfig
from .db import Database
from .jobends import announce
from .logs import configure_logging
from .modelinfo import write_model_info
from .runtime import (
    JobAborted,
    JobFailure,
    JobGuard,
    cap_address_space,
    check_result_size,
    describe_error,
    keep_freed_memory,
    release_free_memory,
)
from .types import JobEnd, JobRecord, JobStatus, ResultInfo
from .wake import bind_wake_socket, wait_for_wake

WAIT_S = 0.2             # longest sleep between claims when no datagram arrives
RETURN_WAIT_SHARE = 0.25  # waiting for returning users: at most this share of the last run's time
HEARTBEAT_S = 1.0
PARAM_HASH_ENV = "SANDBOX_TEST_PARAM_HASH"
log = logging.getLogger("sandbox_server.worker")     # not __name__, which is "__main__" under python -m


class ModelWorker:
    """Serves one model: ``load()`` once, then ``serve()`` until SIGTERM; ``run_job`` runs one claimed job."""

    def __init__(self, config: ServerConfig, model: ModelConfig, db: Database | None = None,
                 store: ResultStore | None = None) -> None:
        self.config = config
        self.cfg = model
        self.db = db or Database(config.db_path)
        self._store = store
        self.stopping = False
        self.pid = os.getpid()
        self.memory_limit: int | None = None
        self._last_beat = 0.0
        self._wake: socket.socket | None = None       # the wake socket while ``serve`` runs
        self._returning: set[str] = set()              # keys whose jobs the last run ended
        self._last_run_s = 0.0

    # ----- start-up --------------------------------------------------------------------------
    def load(self) -> None:
        """Load the model, publish its info, prepare signing and the guard, then cap memory; state "ready"."""
        from sandbox_client.interpreter import LanguageModelRunner

        from .models import load_model

        self.db.set_worker(self.cfg.name, self.pid, "loading")
        torch.set_num_threads(self.cfg.threads)
        started = time.monotonic()
        model, tokenizer = load_model(self.cfg)
        self.model: nn.Module = model
        self.runner = LanguageModelRunner(model, tokenizer)   # the same runner a local trace uses
        self.spec = ModelSpec.from_module(model, name=self.cfg.name)
        write_model_info(self.config.model_dir(self.cfg.name), self.cfg, model, tokenizer)
        self.flags = model_flags(model)
        self.signer = Signer.load_or_create(self.config.signing_key_path)
        self.store = self._store or _open_store(self.config)
        self.guard = JobGuard(self.db.cancels_requested)
        if torch.device(self.cfg.device).type == "cpu":
            # an address-space cap would also count a GPU driver's reservations: there only the supervisor's
            # resident-memory check applies
            self.memory_limit = cap_address_space(self.config.jobs.worker_memory_mb)
        self._record_param_hash("load")
        release_free_memory()
        keep_freed_memory(self.config.jobs.worker_heap_keep_mb)
        self.db.set_worker(self.cfg.name, self.pid, "ready")
        cap = f", jobs capped at {self.config.jobs.worker_memory_mb} MiB" if self.memory_limit else ""
        log.info("worker %s (pid %d) ready in %.2f s%s", self.cfg.name, self.pid, time.monotonic() - started, cap,
                 extra={"model": self.cfg.name})

    # ----- the loop --------------------------------------------------------------------------
    def serve(self) -> None:
        """Claim and run jobs until ``stopping``; sleeps on the wake socket between claims."""
        sock = self._wake = bind_wake_socket(self.config.wake_socket(self.cfg.name))
        try:
            while not self.stopping:
                self.run_queued()
                self._heartbeat(None)
                wait_for_wake(sock, WAIT_S)
        finally:
            self._wake = None
            sock.close()
            self.config.wake_socket(self.cfg.name).unlink(missing_ok=True)
            self.db.set_worker(self.cfg.name, self.pid, "down")

    def run_queued(self) -> int:
        """Run queued jobs of this model until the queue is empty (or SIGTERM); returns how many ran."""
        count = 0
        while not self.stopping:
            jobs = self.claim()
            if not jobs:
                break
            started = time.monotonic()
            if len(jobs) == 1:
                self.run_job(jobs[0])
            else:
                self.run_batch(jobs)
            self._returning, self._last_run_s = {job.key_id for job in jobs}, time.monotonic() - started
            count += len(jobs)
        return count

    def claim(self) -> list[JobRecord]:
        """The next jobs in fair order: one, or up to ``[batching] max_batch``.

        When fewer are queued, wait ``batch_wait_ms`` for more; while jobs keep arriving, each within
        ``batch_wait_ms`` of the one before (many users starting at once, or one user's parallel jobs), keep
        filling for up to ``burst_wait_ms``. Wait longer while users whose jobs the last run ended have not sent
        their next one: up to ``return_wait_ms`` and a quarter of that run's time. Users who send a job, wait
        for its result and send the next would otherwise split into two groups that alternate, each in
        half-full batches; waiting briefly for the returning group keeps them in one. A lone job waits
        ``batch_wait_ms`` only.
        """
        batching = self.config.batching
        if batching.max_batch <= 1:
            job = self.db.claim_next(self.cfg.name, self.pid)
            return [job] if job is not None else []
        jobs = self.db.claim_batch(self.cfg.name, self.pid, batching.max_batch)
        if not jobs:
            return jobs
        start = last = time.monotonic()
        gap_s, burst_s = batching.batch_wait_ms / 1000.0, max(batching.batch_wait_ms, batching.burst_wait_ms) / 1000.0
        returning = self._returning - {job.key_id for job in jobs}
        return_s = min(batching.return_wait_ms / 1000.0, RETURN_WAIT_SHARE * self._last_run_s)
        while len(jobs) < batching.max_batch:
            until = max(min(last + gap_s, start + burst_s), start + return_s if returning else start)
            now = time.monotonic()
            if now >= until:
                break
            self._sleep_for_jobs(until - now)
            more = self.db.claim_batch(self.cfg.name, self.pid, batching.max_batch - len(jobs))
            if more:
                jobs, last = jobs + more, time.monotonic()
                returning -= {job.key_id for job in more}
        return jobs

    def _sleep_for_jobs(self, seconds: float) -> None:
        """Until a job is queued (the web tier's datagram) or ``seconds`` pass; without the wake socket (outside
        ``serve``) at most 5 ms, so the caller polls the queue."""
        if self._wake is not None:
            wait_for_wake(self._wake, max(seconds, 0.0))
        else:
            time.sleep(min(max(seconds, 0.0), 0.005))

    # ----- several jobs: co-batching ---------------------------------------------------------
    def run_batch(self, jobs: list[JobRecord]) -> dict[str, JobStatus]:
        """Run claimed jobs, merging compatible ones into one forward (``cobatch``); {job id: end status}.

        Each merged group runs under one guard: the deadline is ``timeout_s`` from the group's start (every
        job's clock is restarted then, so the supervisor measures the same); a cancel stops the group, the
        cancelled job ends CANCELLED and the rest run merged again; a timeout sends every member to run alone
        with its own full limit (the slow one cannot be told apart). Jobs that may not share a batch, fail
        to validate, or that ``cobatch`` hands back, run alone afterwards through ``run_job``.
        """
        self._heartbeat(jobs[0].id, force=True)
        ended: dict[str, JobStatus] = {}
        alone: list[JobRecord] = []
        graphs: dict[str, Graph] = {}
        for job in jobs:
            try:
                graphs[job.id] = validate(self.db.job_request(job.id), self.spec, self.config.limits).graph
            except Exception:   # run_job validates again and reports the error exactly as for a lone job
                alone.append(job)
        ready = [job for job in jobs if job.id in graphs]
        try:
            groups = group_jobs(self.runner, [graphs[job.id] for job in ready], self.config.batching.max_batch_tokens)
        except Exception:       # e.g. an input the tokenizer refuses: alone, the job gets its own error
            groups = [[i] for i in range(len(ready))]
        for group in groups:
            members = [ready[i] for i in group]
            if len(members) == 1:
                alone.append(members[0])
            else:
                ended.update(self._run_group(members, graphs, alone))
        for job in sorted(alone, key=jobs.index):
            self.db.restart_clock([job.id])
            ended[job.id] = self.run_job(job)
        return ended

    def _run_group(self, members: list[JobRecord], graphs: dict[str, Graph],
                   alone: list[JobRecord]) -> dict[str, JobStatus]:
        ended: dict[str, JobStatus] = {}
        pending = list(members)
        timeout = self.config.jobs.timeout_s
        while len(pending) > 1:
            ids = [job.id for job in pending]
            self._heartbeat(ids[0], force=True)
            self.db.restart_clock(ids)
            try:
                with self.guard.watch(ids, timeout) as guard, \
                        user_function_deadline(time.monotonic() + timeout):
                    run = run_together(self.runner, [graphs[i] for i in ids])
                    guard.check()
            except JobAborted as exc:
                cancelled = set(self.guard.cancelled) if exc.reason == "cancelled" else set()
                if not cancelled:
                    alone.extend(pending)
                    return ended
                ends = [self._outcome(job, error=exc) for job in pending if job.id in cancelled]
                ended.update(self._end_all(ends))
                pending = [job for job in pending if job.id not in cancelled]
                continue
            finally:
                self._check_model()
            ends = []
            for k, job in enumerate(pending):
                if k in run.results:
                    ends.append(self._outcome(job, values=run.results[k]))
                else:
                    alone.append(job)
            ended.update(self._end_all(ends))
            return ended
        alone.extend(pending)
        return ended

    def _outcome(self, job: JobRecord, values: dict[int, Any] | None = None,
                 error: BaseException | None = None) -> JobEnd:
        """How one job of a co-batch ends: its own values stored (encoded, signed, size-checked), or ``error``."""
        try:
            if error is not None:
                raise error
            return JobEnd(job.id, JobStatus.COMPLETED, result=self._encode_and_store(job.id, values or {}))
        except BaseException as exc:
            if isinstance(exc, (KeyboardInterrupt, SystemExit)):
                raise
            report = describe_error(exc, self.config.jobs.timeout_s, self.config.jobs.worker_memory_mb)
            return JobEnd(job.id, JobStatus.CANCELLED if report.code == "cancelled" else JobStatus.ERROR, report)

    # ----- one job ---------------------------------------------------------------------------
    def run_job(self, job: JobRecord) -> JobStatus:
        """Run a claimed (RUNNING) job to its end; returns the status it ended with."""
        self._heartbeat(job.id, force=True)
        timeout = self.config.jobs.timeout_s
        status, result, error = JobStatus.COMPLETED, None, None
        started = time.monotonic()
        try:
            result = self._execute(job, timeout)
        except BaseException as exc:  # JobAborted is a BaseException on purpose
            if isinstance(exc, (KeyboardInterrupt, SystemExit)):
                raise
            if time.monotonic() - started >= timeout and not isinstance(exc, JobAborted):
                exc = JobAborted("timeout")   # e.g. a user function's loop stopped at the job's deadline
            error = describe_error(exc, timeout, self.config.jobs.worker_memory_mb)
            status = JobStatus.CANCELLED if error.code == "cancelled" else JobStatus.ERROR
        finally:
            self._check_model()
        self._end_all([JobEnd(job.id, status, error, result)])
        return status

    def _end_all(self, ends: list[JobEnd]) -> dict[str, JobStatus]:
        """Record the jobs' ends in one transaction, then announce them to the web tier's long polls at once.

        A co-batch's jobs end together: while they were announced one by one, their users' next requests
        took the CPU from the worker still storing the others' results (16 results took 99 ms to end, not 16)."""
        if not ends:
            return {}
        ended = set(self.db.finish_jobs(ends))
        announce(self.config.web_socket_dir, [end.job_id for end in ends if end.job_id in ended])
        for end in ends:
            if end.job_id not in ended and end.result is not None:
                self.store.delete(end.result.key)   # the supervisor ended the job meanwhile: nobody will fetch this
            self._record_param_hash(end.job_id)
        return {end.job_id: end.status for end in ends}

    def _execute(self, job: JobRecord, timeout: float) -> ResultInfo:
        checked = validate(self.db.job_request(job.id), self.spec, self.config.limits)
        with self.guard.watch(job.id, timeout) as guard, user_function_deadline(time.monotonic() + timeout):
            values = self.runner.run(checked.graph)
            guard.check()
            return self._encode_and_store(job.id, values)

    def _encode_and_store(self, job_id: str, values: dict[int, Any]) -> ResultInfo:
        try:
            data = encode_results({str(k): v for k, v in values.items()})
        except BundleError as err:
            raise JobFailure("result_encoding", str(err)) from None
        del values
        check_result_size(len(data), self.config.limits.max_result_bytes)
        return self._store_result(job_id, data)

    def _store_result(self, job_id: str, data: bytes) -> ResultInfo:
        sha = hashlib.sha256(data).hexdigest()
        key = "results/" + secrets.token_urlsafe(32)
        try:
            self.store.put(key, data)
        except StorageError as err:
            raise JobFailure("storage", f"the result could not be stored ({err}); submit the job again") from None
        return ResultInfo(key=key, sha256=sha, signature=self.signer.sign(result_message(job_id, sha)),
                          size=len(data), expires=time.time() + self.config.jobs.result_ttl_s)

    # ----- invariants ------------------------------------------------------------------------
    def _check_model(self) -> None:
        """Put back requires_grad and training flags if a job changed them (the interpreter should not)."""
        if model_flags(self.model) != self.flags:
            log.warning("worker %s: a job changed requires_grad/training flags; restored", self.cfg.name,
                        extra={"model": self.cfg.name})
            restore_flags(self.model, self.flags)

    def _record_param_hash(self, label: str) -> None:
        if os.environ.get(PARAM_HASH_ENV) != "1":
            return
        folder = self.config.data_dir / "test"
        folder.mkdir(parents=True, exist_ok=True)
        with open(folder / f"param-hashes-{self.cfg.name}.txt", "a") as f:
            f.write(f"{label} {model_hash(self.model)}\n")

    def _heartbeat(self, job_id: str | None, force: bool = False) -> None:
        now = time.monotonic()
        if force or now - self._last_beat >= HEARTBEAT_S:
            self._last_beat = now
            self.db.heartbeat(self.cfg.name, job_id)


def model_flags(model: nn.Module) -> tuple[tuple[bool, ...], tuple[bool, ...]]:
    """Every parameter's requires_grad and every module's training flag, in a fixed order."""
    return (tuple(p.requires_grad for p in model.parameters()), tuple(m.training for m in model.modules()))


def restore_flags(model: nn.Module, flags: tuple[tuple[bool, ...], tuple[bool, ...]]) -> None:
    for param, wanted in zip(model.parameters(), flags[0], strict=True):
        param.requires_grad_(wanted)
    for module, training in zip(model.modules(), flags[1], strict=True):
        module.training = training


def model_hash(model: nn.Module) -> str:
    """SHA-256 over every parameter and buffer (name, dtype, shape, bytes, requires_grad, grad present)
    and every module's training flag."""
    digest = hashlib.sha256()
    tensors: list[tuple[str, torch.Tensor]] = [*model.named_parameters(), *model.named_buffers()]
    for name, tensor in tensors:
        grad = isinstance(tensor, nn.Parameter) and tensor.grad is not None
        digest.update(f"{name}|{tensor.dtype}|{tuple(tensor.shape)}|{tensor.requires_grad}|{grad}|".encode())
        digest.update(tensor.detach().cpu().contiguous().view(torch.uint8).numpy().tobytes())
    digest.update(bytes(m.training for m in model.modules()))
    return digest.hexdigest()


def _open_store(config: ServerConfig) -> ResultStore:
    from .stores import open_store

    return open_store(config)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m sandbox_server.worker", description=__doc__.split("\n")[0])
    parser.add_argument("--config", required=True, help="the server's TOML file")
    parser.add_argument("--model", required=True, help="the [[models]] name this worker serves")
    args = parser.parse_args(argv)
    os.environ["HF_HUB_OFFLINE"] = "1"        # before transformers is imported: never reach the network
    config = ServerConfig.load(args.config)
    configure_logging(config.logging)
    model = config.model(args.model)
    if model is None:
        parser.error(f"no [[models]] entry named {args.model!r} in {args.config}")
    worker = ModelWorker(config, model)

    def stop(signum: int, frame: Any) -> None:
        worker.stopping = True

    signal.signal(signal.SIGTERM, stop)
    signal.signal(signal.SIGINT, stop)
    try:
        worker.load()
    except Exception as err:
        log.error("worker %s: cannot load the model: %s: %s", model.name, type(err).__name__, err,
                  extra={"model": model.name})
        worker.db.set_worker(model.name, os.getpid(), "down")
        return 3
    worker.serve()
    log.info("worker %s (pid %d) stopped", model.name, worker.pid, extra={"model": model.name})
    return 0


if __name__ == "__main__":
    sys.exit(main())
