"""The server's parent process: one worker per model, gunicorn for the API, and a monitor loop.

    serve(ServerConfig.load("server.toml"))      # what `interp-sandbox serve` runs; returns 0 after SIGTERM/SIGINT

Start-up, in order: the data folder and database, the result-signing key (created here, before any
process could race to create it), jobs a previous server left RUNNING end ERROR "server_restarted"
(QUEUED and finished jobs survive), then one ``python -P -m sandbox_server.worker`` per model and the web tier,
``python -P -m sandbox_server.gunicorn_app`` (gunicorn, its settings set in code), each in its own process group
(with ``shared_imports``, the first ones are forked from a zygote that imported torch once: ``zygote.py``).
``-P``: children import the installed packages, never a same-named folder in the working directory.

The monitor loop (every 0.2 s) restarts a worker that died, failing its running job with "worker_died";
kills and restarts a worker whose job runs past ``timeout_s + kill_grace_s`` ("timeout", for what the
in-process guard cannot interrupt, such as one long C call) or whose resident memory passes the cap
("memory_limit"); restarts gunicorn if it dies; and every ``sweep_interval_s`` deletes expired results.
Restarts back off (0 s, 1 s, 2 s, ... 30 s) unless the process had run for a minute. Each event is one
record of the ``sandbox_server.supervisor`` logger (``serve`` sets up logging from ``[logging]``: see
``sandbox_server.logs``); a worker's death, a kill and a failed cleanup are warnings.
"""
from __future__ import annotations

import logging
import os
import resource
import signal
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from storage import ResultStore, Signer

from .config import ModelConfig, ServerConfig, dump_toml
from .db import Database
from .jobends import announce
from .logs import configure_logging
from .modelinfo import clear_model_info
from .types import JobError, JobRecord
from .zygote import ForkedProcess, Zygote, ZygoteError

TICK_S = 0.2
STOP_WAIT_S = 10.0          # after SIGTERM, how long children may finish (at least a job's limit) before SIGKILL
MAX_BACKOFF_S = 30.0
STABLE_S = 60.0             # a process that ran this long restarts at once, and its backoff resets
log = logging.getLogger(__name__)


@dataclass
class Child:
    """One supervised process and its restart bookkeeping."""

    name: str
    command: list[str]                 # its own exec (without the zygote, or when a test stands in a command)
    entry: tuple[str, list[str]]       # the zygote's entry point and arguments
    proc: subprocess.Popen[bytes] | ForkedProcess | None = None
    started: float = 0.0
    restarts: int = 0
    backoff: float = 0.0
    next_start: float = 0.0
    base_rss: int | None = None        # resident bytes once the model was loaded (memory cap baseline)
    killed_for: str | None = None      # why the supervisor killed it, so its death is not reported twice

    @property
    def pid(self) -> int | None:
        return self.proc.pid if self.proc is not None else None

    def alive(self) -> bool:
        return self.proc is not None and self.proc.poll() is None


class Supervisor:
    """Starts, watches and stops the model workers and the web tier of one server."""

    def __init__(self, config: ServerConfig) -> None:
        self.config = config
        self.stopping = False
        config.data_dir.mkdir(mode=0o700, parents=True, exist_ok=True)   # requests, key hashes, results: private
        self.config_path = _config_file(config)
        self.db = Database(config.db_path)
        self.env = {**os.environ, "SANDBOX_CONFIG": str(self.config_path), "HF_HUB_OFFLINE": "1"}
        if config.omp_wait_policy:     # read once when torch loads its OpenMP runtime: set before any import
            self.env["OMP_WAIT_POLICY"] = config.omp_wait_policy.upper()
        self.workers = {m.name: Child(m.name, *_worker_command(self.config_path, m)) for m in config.models}
        self.web = Child("web", *_web_command(self.config_path))
        self.zygote: Zygote | None = None
        self._store: ResultStore | None = None
        self._next_sweep = time.monotonic() + config.jobs.sweep_interval_s

    # ----- start and stop --------------------------------------------------------------------
    def prepare(self) -> None:
        """Signing key, jobs left RUNNING by a previous server, stale model info: before any child starts."""
        signer = Signer.load_or_create(self.config.signing_key_path)
        log.info("result signing key %s (%s)", signer.fingerprint, self.config.signing_key_path)
        stale = self._fail_running(None, JobError(
            "server_restarted", "the server restarted while this job ran; submit it again"))
        if stale:
            log.warning("%d job(s) left running by the previous server ended ERROR server_restarted", len(stale),
                        extra={"jobs": stale})
        for model in self.config.models:
            clear_model_info(self.config.model_dir(model.name))
            self.db.set_worker(model.name, None, "loading")

    def start(self) -> None:
        self.prepare()
        if self.config.shared_imports:
            self._start_zygote()
        for child in self.workers.values():
            self._spawn(child)
        self._spawn(self.web)
        if self.zygote is not None:    # its originals of the pages every child has since written would be
            self.zygote.close()        # held twice; restarted processes exec on their own
            self.zygote = None
        log.info("serving on http://%s:%d (%d model worker(s), data in %s)", self.config.host, self.config.port,
                 len(self.workers), self.config.data_dir)

    def stop(self) -> None:
        """SIGTERM every child (the web tier first); a worker finishes its job first. SIGKILL what is left after
        STOP_WAIT_S or the job limit (timeout_s + kill_grace_s), whichever is longer."""
        children = [self.web, *self.workers.values()]
        for child in children:
            _signal(child, signal.SIGTERM)
        wait = max(STOP_WAIT_S, self.config.jobs.timeout_s + self.config.jobs.kill_grace_s)
        deadline = time.monotonic() + wait
        for child in children:
            if child.proc is None:
                continue
            try:
                child.proc.wait(max(deadline - time.monotonic(), 0.01))
            except subprocess.TimeoutExpired:
                log.warning("%s (pid %s) did not stop in %g s: killed", child.name, child.pid, wait)
                _signal(child, signal.SIGKILL)
                child.proc.wait()
        if self.zygote is not None:
            self.zygote.close()
            self.zygote = None
        for name in self.workers:
            self.db.set_worker(name, None, "down")
        log.info("server stopped")

    # ----- the monitor loop ------------------------------------------------------------------
    def run(self) -> None:
        while not self.stopping:
            try:
                self.tick()
            except Exception as err:   # e.g. the database briefly locked: log it, the next tick tries again
                log.error("monitor: %s: %s", type(err).__name__, err)
            time.sleep(TICK_S)

    def tick(self, now: float | None = None) -> None:
        """One round of checks (all cheap: a few process polls, one small query)."""
        mono = time.monotonic()
        for child in self.workers.values():
            self._check_worker(child)
        if not self.web.alive() and not self.stopping:
            self._restart_if_due(self.web, "web server (gunicorn)")
        self._check_running_jobs(now or time.time())
        if mono >= self._next_sweep:
            self._next_sweep = mono + self.config.jobs.sweep_interval_s
            self.sweep(now or time.time())

    def _check_worker(self, child: Child) -> None:
        if child.alive():
            self._check_memory(child)
            return
        if child.proc is not None:
            self._worker_died(child)
        self._restart_if_due(child, f"worker {child.name}")

    def _worker_died(self, child: Child) -> None:
        assert child.proc is not None
        code = child.proc.poll()
        assert code is not None
        how = f"signal {-code}" if code < 0 else f"exit code {code}"
        failed = self._fail_running(child.name, JobError(
            "worker_died", f"the model worker process died ({how}) while running this job; the server restarted "
            "it; submit again"), pid=child.pid)
        clear_model_info(self.config.model_dir(child.name))
        self.db.set_worker(child.name, None, "down")
        reason = f", {child.killed_for}" if child.killed_for else ""
        log.warning("worker %s (pid %s) ended (%s%s); %d running job(s) failed", child.name, child.pid, how, reason,
                    len(failed), extra={"model": child.name, "jobs": failed})
        self._schedule_restart(child)

    def _schedule_restart(self, child: Child) -> None:
        """Restart at once after a long run or a kill for a job's sake; back off after quick crashes."""
        if child.proc is not None:     # what the dead process left in its group (gunicorn's own workers)
            _kill_group(child.proc.pid)
        stable = child.killed_for is not None or time.monotonic() - child.started >= STABLE_S
        delay = 0.0 if stable else child.backoff
        if not child.killed_for:
            child.backoff = 1.0 if stable else min(max(child.backoff * 2, 1.0), MAX_BACKOFF_S)
        child.next_start = time.monotonic() + delay
        child.proc = None

    def _restart_if_due(self, child: Child, what: str) -> None:
        if self.stopping:
            return
        if child.proc is not None:          # the web tier: report its death once, then back off
            code = child.proc.returncode
            log.warning("%s (pid %s) ended with code %s; restarting", what, child.pid, code)
            self._schedule_restart(child)
        if time.monotonic() >= child.next_start:
            child.restarts += 1
            self._spawn(child)

    def _check_running_jobs(self, now: float) -> None:
        limit = self.config.jobs.timeout_s + self.config.jobs.kill_grace_s
        for job in self.db.running_jobs():
            if job.started is not None and now - job.started > limit:
                self._kill_for_timeout(job)

    def _kill_for_timeout(self, job: JobRecord) -> None:
        child = self.workers.get(job.model)
        if child is None or not child.alive() or child.pid != job.worker_pid:
            self._fail_running(job.model, JobError("worker_died", "the worker running this job is gone; "
                                                   "submit again"), pid=job.worker_pid)
            return
        timeout = self.config.jobs.timeout_s
        self._fail_running(job.model, JobError(
            "timeout", f"the job ran past its limit of {timeout:g} s and did not stop, so the server restarted the "
            "model worker; shorten it: fewer or shorter prompts, a smaller max_new_tokens, or split it"), pid=child.pid)
        self._kill(child, f"job {job.id} past its time limit")

    def _fail_running(self, model: str | None, error: JobError, pid: int | None = None) -> list[str]:
        """End running jobs ERROR (``Database.fail_running``) and announce it to the web tier's long polls."""
        failed = self.db.fail_running(model, error, pid=pid)
        announce(self.config.web_socket_dir, failed)
        return failed

    def _check_memory(self, child: Child) -> None:
        cap = self.config.jobs.worker_memory_mb
        if cap <= 0 or child.pid is None:
            return
        rss = resident_bytes(child.pid)
        if child.base_rss is None:
            if self._worker_ready(child):
                child.base_rss = rss
            return
        if rss > child.base_rss + cap * 2**20:
            self._fail_running(child.name, JobError(
                "memory_limit", f"the job used more than {cap} MiB of memory above the model, so the server "
                "restarted the model worker; use fewer or shorter prompts or split the job"), pid=child.pid)
            self._kill(child, f"resident memory {rss >> 20} MiB over the cap")

    def _worker_ready(self, child: Child) -> bool:
        return any(w.model == child.name and w.pid == child.pid and w.state == "ready" for w in self.db.workers())

    def _kill(self, child: Child, why: str) -> None:
        child.killed_for = why
        log.warning("killing worker %s (pid %s): %s", child.name, child.pid, why, extra={"model": child.name})
        _signal(child, signal.SIGKILL)

    # ----- results ---------------------------------------------------------------------------
    def sweep(self, now: float) -> int:
        """Delete results past their expiry from the store and mark their jobs; returns how many."""
        expired = self.db.expired_results(now)
        if not expired:
            return 0
        store = self._results_store()
        count = 0
        for job_id, key in expired:
            try:
                store.delete(key)
            except Exception as err:   # the store is down: keep the row and try again next sweep
                log.warning("sweeper: cannot delete %s: %s", key, err)
                continue
            self.db.mark_expired(job_id)
            count += 1
        log.info("sweeper: %d expired result(s) deleted", count)
        return count

    def _results_store(self) -> ResultStore:
        if self._store is None:
            from .stores import open_store

            self._store = open_store(self.config)
        return self._store

    # ----- processes -------------------------------------------------------------------------
    def _start_zygote(self) -> None:
        started = time.monotonic()
        try:
            self.zygote = Zygote.start(self.env)
        except ZygoteError as err:
            log.warning("no shared imports: %s; each process starts on its own", err)
            return
        log.info("zygote (pid %d) imported torch and the server in %.1f s; workers and the web tier fork from it",
                 self.zygote.proc.pid, time.monotonic() - started)

    def _spawn(self, child: Child) -> None:
        child.killed_for, child.base_rss = None, None
        child.proc = None
        if self.zygote is not None:
            try:
                child.proc = self.zygote.spawn(*child.entry)
            except ZygoteError as err:
                log.warning("zygote failed (%s); processes now start on their own", err)
                self.zygote.close()
                self.zygote = None
        if child.proc is None:
            child.proc = subprocess.Popen(child.command, env=self.env, process_group=0, stdin=subprocess.DEVNULL)
        child.started = time.monotonic()
        if child is not self.web:
            self.db.set_worker(child.name, child.proc.pid, "loading", restarts=child.restarts)
        again = f" (restart {child.restarts})" if child.restarts else ""
        log.info("started %s (pid %d)%s", child.name, child.proc.pid, again)


def serve(config: ServerConfig) -> int:
    """Run the server until SIGTERM or SIGINT; returns the exit status (0 after a clean stop)."""
    configure_logging(config.logging)
    supervisor = Supervisor(config)

    def stop(signum: int, frame: Any) -> None:
        supervisor.stopping = True

    previous = {s: signal.signal(s, stop) for s in (signal.SIGTERM, signal.SIGINT)}
    try:
        supervisor.start()
        supervisor.run()
    finally:
        supervisor.stop()
        for sig, handler in previous.items():
            signal.signal(sig, handler)
    return 0


def resident_bytes(pid: int) -> int:
    """A process's resident set size in bytes (0 if it is gone or /proc is missing)."""
    try:
        with open(f"/proc/{pid}/statm") as f:
            return int(f.read().split()[1]) * resource.getpagesize()
    except (OSError, ValueError, IndexError):
        return 0


def _config_file(config: ServerConfig) -> Path:
    """The TOML file children load: the one given, or the embedded defaults written to <data_dir>/server.toml."""
    if config.source_path is not None:
        return config.source_path
    path = config.data_dir / "server.toml"
    path.write_text(dump_toml(config))
    return path


def _worker_command(config_path: Path, model: ModelConfig) -> tuple[list[str], tuple[str, list[str]]]:
    """The worker's own command line, and its zygote entry point."""
    args = ["--config", str(config_path), "--model", model.name]
    return [sys.executable, "-P", "-m", "sandbox_server.worker", *args], ("worker", args)


def _web_command(config_path: Path) -> tuple[list[str], tuple[str, list[str]]]:
    """The web tier (``sandbox_server.gunicorn_app``): its own command line, and its zygote entry point."""
    args = ["--config", str(config_path)]
    return [sys.executable, "-P", "-m", "sandbox_server.gunicorn_app", *args], ("web", args)


def _signal(child: Child, sig: int) -> None:
    if child.proc is None or child.proc.poll() is not None:
        return
    try:
        os.killpg(child.proc.pid, sig)    # the whole group: a child's own children go too
    except ProcessLookupError:
        pass


def _kill_group(pgid: int) -> None:
    try:
        os.killpg(pgid, signal.SIGKILL)
    except (ProcessLookupError, PermissionError):
        pass

