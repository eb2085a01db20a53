"""Job-end announcements wake long polls at once, without polling the database meanwhile."""
from __future__ import annotations

import socket
import threading
import time
from pathlib import Path

from sandbox_server import jobends
from sandbox_server.jobends import SAFETY_POLL_S, JobEnds, announce


def _waiter(ends: JobEnds, job_id: str, timeout: float, reads: list[float]) -> threading.Thread:
    def still_running() -> bool:
        reads.append(time.monotonic())
        return True

    thread = threading.Thread(target=ends.wait_for, args=(job_id, timeout, still_running))
    thread.start()
    return thread


def test_an_announced_end_wakes_its_waiter_at_once(tmp_path: Path) -> None:
    ends, reads = JobEnds(tmp_path / "web"), []
    thread = _waiter(ends, "job_a", 10.0, reads)
    time.sleep(0.1)
    started = time.monotonic()
    announce(tmp_path / "web", ["job_other", "job_a"])
    thread.join(5)
    assert not thread.is_alive()
    assert time.monotonic() - started < 0.2          # woken, not the 0.5 s safety read nor the 10 s timeout
    assert len(reads) == 1                           # one database read while waiting, at registration


def test_without_announcement_the_database_is_read_only_every_safety_interval(tmp_path: Path) -> None:
    ends, reads = JobEnds(tmp_path / "web"), []
    started = time.monotonic()
    _waiter(ends, "job_a", 1.2, reads).join(5)
    assert 1.1 < time.monotonic() - started < 2.0
    assert len(reads) <= 1.2 / SAFETY_POLL_S + 1      # 3 reads in 1.2 s, where polling every 5 ms made 240


def test_an_end_that_the_database_already_shows_returns_without_waiting(tmp_path: Path) -> None:
    started = time.monotonic()
    JobEnds(tmp_path / "web").wait_for("job_a", 10.0, lambda: False)
    assert time.monotonic() - started < 0.1


def test_other_jobs_announcements_do_not_end_the_wait(tmp_path: Path) -> None:
    ends, reads = JobEnds(tmp_path / "web"), []
    thread = _waiter(ends, "job_a", 0.6, reads)
    time.sleep(0.1)
    announce(tmp_path / "web", ["job_b"])
    time.sleep(0.2)
    assert thread.is_alive()
    thread.join(5)


def test_a_socket_whose_process_is_gone_is_removed_by_the_sender(tmp_path: Path) -> None:
    folder = tmp_path / "web"
    folder.mkdir()
    stale = folder / "999999.sock"
    with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as sock:
        sock.bind(str(stale))                         # bound, then closed: what a crashed process leaves
    announce(folder, ["job_a"])
    assert not stale.exists()


def test_announcing_with_no_listener_folder_is_silent(tmp_path: Path) -> None:
    announce(tmp_path / "missing", ["job_a"])


def test_large_announcements_split_between_ids() -> None:
    ids = [f"job_{i:024d}" for i in range(5000)]
    chunks = jobends._chunks(ids)
    assert len(chunks) > 1 and all(len(c) <= jobends._MAX_DATAGRAM for c in chunks)
    assert [i for c in chunks for i in c.decode().split()] == ids


def test_long_socket_paths_work(tmp_path: Path) -> None:
    folder = tmp_path / ("x" * 90) / "web"
    ends, reads = JobEnds(folder), []
    thread = _waiter(ends, "job_a", 10.0, reads)
    time.sleep(0.1)
    announce(folder, ["job_a"])
    thread.join(5)
    assert not thread.is_alive()
