"""Merging graphs: several jobs' graphs as one graph over one batch (the server's co-batching).

    merged = merge_graphs([graph_a, graph_b])
    merged.graph                  # invokes of a then b; b's nodes renumbered after a's
    merged.job_of(node_id)        # 1 for a node that came from graph_b
    job_invoke_bounds(merged)     # [(0, 1), (1, 3)]: each job's invokes in the merged list

Every node is renumbered (``Ref``s rewritten everywhere in args/kwargs, nested, and in ``after``) and
its ``invoke`` offset; a node without an invoke (the whole batch in a run of its own) points at an
extra "group" invoke index per job, which the runner maps to that job's rows. Pure: graphs in, a graph out.
"""
from __future__ import annotations

import bisect
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from .nodes import Graph, Invoke, Node
from .values import Ref
from .walk import map_leaves


@dataclass(frozen=True)
class Merged:
    """N graphs as one: ``starts[j]`` is job j's first node id, ``groups[j]`` its rows in the batch."""

    graph: Graph
    starts: list[int]
    invoke_counts: list[int]
    group_invoke: int          # invoke index of job 0's group slice (job j: group_invoke + j)

    def job_of(self, node_id: int | None) -> int | None:
        if node_id is None or not 0 <= node_id < len(self.graph.nodes):
            return None
        return bisect.bisect_right(self.starts, node_id) - 1



def merge_graphs(graphs: Sequence[Graph]) -> Merged:
    """One graph running every job of ``graphs`` (all compatible) in one batch."""
    first = graphs[0]
    invokes: list[Invoke] = []
    nodes: list[Node] = []
    starts: list[int] = []
    group_invoke = sum(len(g.invokes) for g in graphs)
    for j, graph in enumerate(graphs):
        node_base, invoke_base = len(nodes), len(invokes)
        starts.append(node_base)
        invokes.extend(graph.invokes)
        for node in graph.nodes:
            nodes.append(Node(
                id=node.id + node_base, op=node.op, target=node.target,
                args=_shift(node.args, node_base), kwargs=_shift(node.kwargs, node_base),
                invoke=group_invoke + j if node.invoke is None else node.invoke + invoke_base,
                step=node.step, after=tuple(a + node_base for a in node.after), source=node.source))
    merged = Graph(kind=first.kind, invokes=invokes, nodes=nodes, options=dict(first.options),
                   version=first.version)
    return Merged(graph=merged, starts=starts, invoke_counts=[len(g.invokes) for g in graphs],
                  group_invoke=group_invoke)


def _shift(value: Any, base: int) -> Any:
    return map_leaves(value, lambda v: Ref(v.id + base) if isinstance(v, Ref) else v)


def job_invoke_bounds(merged: Merged) -> list[tuple[int, int]]:
    """[first invoke, last invoke + 1) of each job in the merged invoke list."""
    bounds: list[tuple[int, int]] = []
    start = 0
    for count in merged.invoke_counts:
        bounds.append((start, start + count))
        start += count
    return bounds
