"""The remote backend: a finished trace becomes a server job; its verified results come back.

    with lm.trace("Hello", remote=True, blocking=False) as tracer:
        h = lm.model.layers[0].output.save()
    tracer.job.status()           # tracer.backend is a RemoteBackend; h.value waits for the job

Blocking traces wait inside the submission itself (one request for a small result); non-blocking
ones return a ``PendingResults`` that waits on first read.
"""
from __future__ import annotations

from collections.abc import Callable, Iterator, Mapping
from typing import Any

from ..graph import Graph
from .job import RemoteJob
from .session import RemoteSession


class RemoteBackend:
    """Runs graphs as jobs of ``session``'s model; ``check`` (the local static checks) runs first.
    ``job`` is the last submitted job."""

    def __init__(self, session: RemoteSession, blocking: bool = True,
                 check: Callable[[Graph], None] | None = None) -> None:
        self.session = session
        self.blocking = blocking
        self.check = check
        self.job: RemoteJob | None = None

    def run(self, graph: Graph) -> Mapping[int, Any]:
        if self.check is not None:
            self.check(graph)
        self.job = self.session.submit(graph, wait=self.blocking)
        return self.job.wait() if self.blocking else PendingResults(self.job)


class PendingResults(Mapping[int, Any]):
    """A job's results, fetched (and verified) on first read."""

    def __init__(self, job: RemoteJob) -> None:
        self.job = job
        self._values: dict[int, Any] | None = None

    def _get(self) -> dict[int, Any]:
        if self._values is None:
            self._values = self.job.wait()
        return self._values

    def __getitem__(self, node_id: int) -> Any:
        return self._get()[node_id]

    def __iter__(self) -> Iterator[int]:
        return iter(self._get())

    def __len__(self) -> int:
        return len(self._get())

    def __contains__(self, node_id: object) -> bool:
        return node_id in self._get()
