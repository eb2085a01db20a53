"""The tracing front end's vocabulary: who records, who runs, and what comes back.

    class PrintingBackend:                       # any object with run(graph) is a Backend
        def run(self, graph: Graph) -> Results:
            print(graph.to_json()); return {}
    with lm.trace("Hello", backend=PrintingBackend()): ...

A ``Tracer`` records nodes (it is the ``proxy.Recorder`` that proxies and envoys talk to), asks its model
(a ``TraceHost``) what it needs while recording, and on exit hands the finished graph to a
``Backend``: local execution, a remote server, or a shape-only scan.
"""
from __future__ import annotations

from collections.abc import Mapping
from typing import TYPE_CHECKING, Any, Protocol

if TYPE_CHECKING:
    from .graph import Graph, Node
    from .proxy import Recorder

#: {node id: saved value} of one run
Results = Mapping[int, Any]


class Backend(Protocol):
    """Runs a finished graph and returns its saved values (a lazy Mapping for a job still running)."""

    def run(self, graph: Graph) -> Results: ...


class TraceHost(Protocol):
    """What a tracer needs from its model while recording (a ``sc.Model``)."""

    def open_trace(self, tracer: Recorder) -> None: ...

    def close_trace(self, tracer: Recorder) -> None: ...

    def value_length(self, node: Node, tracer: Recorder) -> int | None: ...
