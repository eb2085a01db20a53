"""Memory of a process tree, each physical page counted once, however many of its processes map it.

    with TreeMemory(server_pid) as mem:          # samples in a thread every 0.1 s
        ...                                      # the workload
    mem.peak_mb, mem.file_mb, mem.by_process     # peak total, file-backed part, each process at the peak

Anonymous memory (heap, tensors, Python objects) is summed as PSS (``Pss_Anon`` + ``Pss_Shmem`` of
``/proc/<pid>/smaps_rollup``): anonymous pages are shared only between a process and what it forked,
which is all inside the tree, so the sum counts each once. Reading smaps_rollup walks the process's page
tables (30 ms for a loaded model worker), so it is read every 2 s, and in between each process's PSS
moves by its change in resident anonymous pages (``/proc/<pid>/status``, cheap): new pages, such as a
forward's activations, are private and count fully in both. File-backed pages (libraries, memory-mapped
weights) are counted exactly, as the number of distinct physical frames the tree's processes map
(``/proc/<pid>/pagemap``, which needs root; without it PSS is used, which splits a library's pages
with any other process mapping it, such as clients on the same machine, and so reads low). File pages
hardly change during a run: they are counted at the start and end of each sample window, anonymous
pages every 0.1 s.
"""
from __future__ import annotations

import os
import threading
import time
from pathlib import Path
from typing import Any

import numpy as np

PAGE = os.sysconf("SC_PAGE_SIZE")
_PFN_MASK = np.uint64((1 << 55) - 1)


def tree_pids(root: int) -> list[int]:
    """``root`` and all its descendants."""
    children: dict[int, list[int]] = {}
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                ppid = int(Path(f"/proc/{entry}/stat").read_text().rsplit(")", 1)[1].split()[1])
            except (OSError, IndexError, ValueError):
                continue
            children.setdefault(ppid, []).append(int(entry))
    found, todo = [], [root]
    while todo:
        pid = todo.pop()
        found.append(pid)
        todo.extend(children.get(pid, []))
    return found


def anon_mb(pid: int) -> float:
    """The process's share of anonymous and shared-memory pages (MiB); 0 if it is gone."""
    return _field_mb(f"/proc/{pid}/smaps_rollup", ("Pss_Anon:", "Pss_Shmem:"))


def rss_anon_mb(pid: int) -> float:
    """Resident anonymous and shared-memory pages of the process (MiB), from /proc/<pid>/status."""
    return _field_mb(f"/proc/{pid}/status", ("RssAnon:", "RssShmem:"))


def _field_mb(path: str, fields: tuple[str, ...]) -> float:
    """The sum of the kB ``fields`` of a /proc file, in MiB; 0 if the process is gone."""
    try:
        rows = Path(path).read_text().splitlines()
    except OSError:
        return 0.0
    return sum(int(line.split()[1]) for line in rows if line.startswith(fields)) / 1024


def file_frames(pid: int) -> np.ndarray | None:
    """Physical frame numbers of the process's resident file-backed pages; None without root."""
    frames = []
    try:
        fd = os.open(f"/proc/{pid}/pagemap", os.O_RDONLY)
    except OSError:
        return None
    try:
        with open(f"/proc/{pid}/maps") as maps:
            for line in maps:
                fields = line.split(maxsplit=5)
                if len(fields) < 6 or not fields[5].startswith("/") or fields[1].startswith("---"):
                    continue
                start, end = (int(x, 16) for x in fields[0].split("-"))
                entries = np.frombuffer(os.pread(fd, (end - start) // PAGE * 8, start // PAGE * 8), dtype=np.uint64)
                frames.append(entries[(entries >> np.uint64(63)) == 1] & _PFN_MASK)
    except OSError:
        return np.zeros(0, np.uint64)
    finally:
        os.close(fd)
    found = np.concatenate(frames) if frames else np.zeros(0, np.uint64)
    if len(found) and not found.any():      # frame numbers hidden: not root
        return None
    return found


def file_mb(pids: list[int]) -> tuple[float, bool]:
    """Distinct resident file-backed pages of ``pids`` (MiB), and whether that is exact (else PSS)."""
    frames = [file_frames(pid) for pid in pids]
    if any(f is None for f in frames):
        return sum(_pss_file_mb(pid) for pid in pids), False
    return len(np.unique(np.concatenate([f for f in frames if f is not None]))) * PAGE / 2**20, True


def _pss_file_mb(pid: int) -> float:
    return _field_mb(f"/proc/{pid}/smaps_rollup", ("Pss_File:",))


def process_name(pid: int) -> str:
    try:
        return Path(f"/proc/{pid}/cmdline").read_text().replace("\0", " ").strip()[:60]
    except OSError:
        return "?"


class TreeMemory:
    """Peak memory of the process tree under ``root`` while the block runs."""

    def __init__(self, root: int, interval_s: float = 0.1, full_every_s: float = 2.0) -> None:
        self.root, self.interval_s, self.full_every_s = root, interval_s, full_every_s
        self.peak_mb = 0.0
        self.file_mb = 0.0
        self.exact = True
        self.by_process: dict[str, float] = {}
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._pids: list[int] = []
        self._base: dict[int, tuple[float, float]] = {}    # pid -> (PSS anon, RSS anon) at the last full read
        self._full_at = 0.0

    def __enter__(self) -> TreeMemory:
        self._pids = tree_pids(self.root)
        self.file_mb, self.exact = file_mb(self._pids)
        self._sample()
        self._thread.start()
        return self

    def __exit__(self, *exc: Any) -> None:
        self._stop.set()
        self._thread.join()
        end_file, _ = file_mb(tree_pids(self.root))
        if end_file > self.file_mb:          # the peak's file part: the larger of the two counts
            self.peak_mb += end_file - self.file_mb
            self.file_mb = end_file

    def _run(self) -> None:
        refreshed = time.monotonic()
        while not self._stop.wait(self.interval_s):
            if time.monotonic() - refreshed > 1.0:       # a restarted or newly forked process
                self._pids, refreshed = tree_pids(self.root), time.monotonic()
            self._sample()

    def _sample(self) -> None:
        if time.monotonic() - self._full_at >= self.full_every_s or set(self._base) != set(self._pids):
            self._base = {pid: (anon_mb(pid), rss_anon_mb(pid)) for pid in self._pids}
            self._full_at = time.monotonic()
        anon = {pid: self._base[pid][0] + rss_anon_mb(pid) - self._base[pid][1] for pid in self._pids}
        total = self.file_mb + sum(anon.values())
        if total > self.peak_mb:
            self.peak_mb = total
            self.by_process = {f"{process_name(pid)} (pid {pid})": mb for pid, mb in anon.items()}
