"""Runs graph nodes as data flows: each node runs once its inputs exist and, for nodes bound
to a model event, while that event is happening (inside the hook).

    ex = Executor(graph, module, rows, batch)
    ex.start()                               # runs nodes that need no model value
    new_out = ex.fire("model.layers.3", "output", out)   # from a forward hook
    ex.finish()                              # every node ran, or a clear error
    ex.results                               # {node id: saved value}

Ready nodes run in graph order (a heap of ids). A value is dropped as soon as the last node
that needs it has run, unless it is saved: a trace over all layers keeps only what it saves.
"""
from __future__ import annotations

import heapq
from collections import defaultdict
from typing import Any, TypeVar

import torch
from torch import nn

from ..errors import InterventionError, OrderError, SandboxError
from ..graph import GRAD_OPS, Graph, Node, Ref
from ..graph.events import EventKey, event_of
from ..graph.walk import map_leaves
from .ops import OpContext, run_op
from .rows import SharedValueError, narrow, narrow_isolated

ALL = "all"


class StopForward(Exception):
    """Raised inside a hook to end the forward early (tracer.stop())."""


class Executor:
    """Dataflow state of one graph run over one batch."""

    def __init__(self, graph: Graph, module: nn.Module, rows: list[slice | None], batch: int,
                 isolated: bool = False) -> None:
        self.graph = graph
        self.nodes = graph.nodes
        self.module = module
        self.rows = rows
        self.batch = batch
        # isolated: the batch holds several jobs' rows (sandbox_server.cobatch): opaque values are withheld,
        # in-place writes into tensors every job shares are refused, and the generated ids are cut too
        self.isolated = isolated
        self.shared: list[torch.Tensor] = []
        self.step = -1
        n = len(self.nodes)
        self.deps: list[tuple[int, ...]] = [node.refs() for node in self.nodes]
        self.users: list[list[int]] = [[] for _ in range(n)]
        self.event_of: list[EventKey | None] = [None] * n
        self.waiting: dict[EventKey, list[int]] = defaultdict(list)
        self.all_step = [node.step == ALL for node in self.nodes]
        self.saved: set[int] = set()
        self.pinned: set[int] = set()
        for node in self.nodes:
            self._index(node)
        self.refcount = [sum(1 for u in self.users[i] if self.all_step[i] or not self.all_step[u]) for i in range(n)]
        self.remaining = [len(d) for d in self.deps]
        self.done = [False] * n
        self.values: dict[int, Any] = {}
        self.results: dict[int, Any] = {}
        self.current: dict[tuple[str, str], Any] = {}
        self.heap: list[int] = []
        self.stop_requested = False
        self.steps_seen = 0
        self.ctx = OpContext(module=module, batch=batch)
        self._ids: dict[EventKey, list[int]] = {}

    # ----- set-up ---------------------------------------------------------------------------
    def _index(self, node: Node) -> None:
        for d in self.deps[node.id]:
            if not 0 <= d < node.id:
                raise OrderError(f"node {node.id} refers to node {d}, which is not an earlier node",
                                 source=node.source)
            self.users[d].append(node.id)
            if self.all_step[node.id] and not self.all_step[d]:
                self.pinned.add(d)
        if node.op == "save":
            self.saved.update(a.id for a in node.args if isinstance(a, Ref))
        event = self._event(node)
        if event is not None:
            self.event_of[node.id] = event
            self.waiting[event].append(node.id)

    def _event(self, node: Node) -> EventKey | None:
        event = event_of(self.nodes, node)
        if node.op in GRAD_OPS and event is None:
            raise OrderError("'.grad' must refer to a module output read", source=node.source)
        return event

    def events(self) -> set[tuple[str, str]]:
        """(path, kind) pairs that need a hook."""
        return {(path, kind) for (path, kind, _step) in self.waiting}

    # ----- running ----------------------------------------------------------------------------
    def start(self) -> None:
        """Run every node that needs no model value (constants, factory calls)."""
        for i in range(len(self.nodes)):
            if self.remaining[i] == 0 and self.event_of[i] is None:
                heapq.heappush(self.heap, i)
        self._drain()

    def begin_step(self) -> None:
        """A new forward call of the root module (generation step)."""
        self.step += 1
        self.steps_seen = self.step + 1
        if self.step == 0:
            return
        for i, is_all in enumerate(self.all_step):
            if is_all:
                self.done[i] = False
                self.values.pop(i, None)
        for i, is_all in enumerate(self.all_step):
            if is_all:
                self.remaining[i] = sum(1 for d in self.deps[i] if not self.done[d])
                self.refcount[i] = len(self.users[i])
                if self.remaining[i] == 0 and self.event_of[i] is None:
                    heapq.heappush(self.heap, i)
        self._drain()

    def wants(self, path: str, kind: str, step: Any = None) -> bool:
        step = self.step if step is None else step
        return bool(self.waiting.get((path, kind, step)) or self.waiting.get((path, kind, ALL)))

    def fire(self, path: str, kind: str, value: Any, step: Any = None) -> Any:
        """The model reached event (path, kind): run the nodes bound to it; return the (new) value."""
        step = self.step if step is None else step
        ids = self._ids.get((path, kind, step))
        if ids is None:
            ids = sorted(set(self.waiting.get((path, kind, step), []) + self.waiting.get((path, kind, ALL), [])))
            self._ids[(path, kind, step)] = ids
        if not ids:
            return value
        key = (path, kind)
        self.current[key] = value
        try:
            for i in ids:
                if self.remaining[i] == 0 and not self.done[i]:
                    heapq.heappush(self.heap, i)
            self._drain(active=key)
            late = [i for i in ids if not self.done[i]]
            if late:
                raise self._late_error(late[0], path, kind)
            return self.current[key]
        finally:
            self.current.pop(key, None)

    def _drain(self, active: tuple[str, str] | None = None) -> None:
        while self.heap:
            i = heapq.heappop(self.heap)
            if self.done[i]:
                continue
            self._run(i)
        if self.stop_requested and all(self.done[i] or self.all_step[i] for i in range(len(self.nodes))):
            raise StopForward()

    def _run(self, i: int) -> None:
        node = self.nodes[i]
        rows = self.rows[node.invoke] if node.invoke is not None and node.invoke < len(self.rows) else None
        try:
            args = _resolve(node.args, self.values) if node.args else ()
            kwargs = _resolve(node.kwargs, self.values) if node.kwargs else {}
            if self.shared:
                versions = [t._version for t in self.shared]
                value = self._execute(node, args, kwargs, rows)
                # strict=False: the node may have added tensors of its own reads to self.shared meanwhile
                if any(t._version != v for t, v in zip(self.shared, versions, strict=False)):
                    raise SharedValueError("it wrote in place into a tensor every job of the batch shares")
            else:
                value = self._execute(node, args, kwargs, rows)
        except SandboxError as exc:
            if exc.node_id is None:
                exc.node_id = i
            raise
        except StopForward:
            raise
        except SharedValueError as exc:
            raise _blamed(InterventionError(f"not isolable in a shared batch: {exc}", source=node.source), i) from exc
        except Exception as exc:
            what = "user function" if node.op == "apply" else f"{node.op} {node.target or ''}".strip()
            raise _blamed(InterventionError(f"{what} failed: {type(exc).__name__}: {exc}", source=node.source),
                          i) from exc
        self.done[i] = True
        if self.refcount[i] > 0 or i in self.saved or i in self.pinned:
            self.values[i] = value
        if i in self.saved:
            self._store_result(i, value)
        for d in self.deps[i]:
            if self.all_step[i] and not self.all_step[d]:
                continue
            self.refcount[d] -= 1
            if self.refcount[d] <= 0 and d not in self.saved and d not in self.pinned:
                self.values.pop(d, None)
        for u in self.users[i]:
            self.remaining[u] -= 1
            if self.remaining[u] == 0 and self._can_run_now(u):
                heapq.heappush(self.heap, u)

    def _can_run_now(self, i: int) -> bool:
        event = self.event_of[i]
        if event is None:
            return True
        path, kind, step = event
        return (path, kind) in self.current and (step == ALL or step == self.step or kind == "grad")

    def _store_result(self, i: int, value: Any) -> None:
        if self.all_step[i]:
            self.results.setdefault(i, []).append(value)
        else:
            self.results[i] = value

    def narrow(self, value: Any, rows: slice | None, batch: int) -> Any:
        return narrow_isolated(value, rows, batch, self.shared) if self.isolated else narrow(value, rows, batch)

    def _execute(self, node: Node, args: tuple[Any, ...], kwargs: dict[str, Any], rows: slice | None) -> Any:
        op = node.op
        if op in ("output", "grad"):
            return self.narrow(self.current[(self.event_of[node.id] or ("", "", 0))[:2]], rows, self.batch)
        if op == "input":
            call_args, _ = self.current[(node.target or "", "input")]
            if not call_args:
                raise ValueError("the module was called without positional arguments; use .inputs instead")
            return self.narrow(call_args[0], rows, self.batch)
        if op == "inputs":
            return self.narrow(self.current[(node.target or "", "input")], rows, self.batch)
        if op in ("set_output", "set_grad"):
            key = (self.event_of[node.id] or ("", "", 0))[:2]
            self.current[key] = self.ctx.merge(self.current[key], args[-1], rows)
            return None
        if op == "set_input":
            key = (node.target or "", "input")
            call_args, call_kwargs = self.current[key]
            if not call_args:
                raise ValueError("the module was called without positional arguments, so .input cannot be set")
            new_first = self.ctx.merge(call_args[0], args[0], rows)
            self.current[key] = ((new_first, *call_args[1:]), call_kwargs)
            return None
        if op == "skip":
            self.current[(node.target or "", "skip")].append((rows, args[0]))
            return None
        if op == "save":
            return None
        if op == "stop":
            self.stop_requested = True
            return None
        if op == "result":
            ids = self.current[("", "result")]
            return self.narrow(ids, rows, self.batch) if self.isolated else ids
        return run_op(self.ctx, node, args, kwargs)

    # ----- ending ---------------------------------------------------------------------------
    def finish(self) -> dict[int, Any]:
        """Check that every node ran; return the saved values."""
        for i in range(len(self.nodes)):
            if not self.done[i] and not (self.all_step[i] and i in self.results):
                if self.all_step[i] and self.step >= 0 and self.event_of[i] is None:
                    continue
                raise self._never_ran(i)
        return self.results

    def _late_error(self, i: int, path: str, kind: str) -> OrderError:
        node = self.nodes[i]
        waiting_on = [d for d in self.deps[i] if not self.done[d]]
        culprit = self.nodes[waiting_on[0]] if waiting_on else None
        blame = f" (it needs the value from {culprit.source or f'node {culprit.id}'})" if culprit else ""
        return _blamed(OrderError(
            f"{_where(path)} {kind} happens before a value this line needs exists{blame}; "
            "a value read later in the forward cannot be used earlier in the same forward: "
            "split it into two traces or use a value from an earlier invoke/step",
            source=node.source,
        ), i)

    def _never_ran(self, i: int) -> SandboxError:
        return _blamed(self._never_ran_error(i), i)

    def _never_ran_error(self, i: int) -> SandboxError:
        node = self.nodes[i]
        event = self.event_of[i]
        if event is not None and event[1] != "result":
            path, kind, step = event
            if isinstance(step, int) and step >= self.steps_seen and self.graph.kind == "generate":
                return InterventionError(
                    f"step {step} never ran: the generation made only {self.steps_seen} forward calls "
                    "(max_new_tokens, or an end-of-sequence token, ended it)", source=node.source)
            if kind == "grad":
                return InterventionError(
                    "this gradient was never computed: call .backward() on a loss that depends on it",
                    source=node.source)
            return InterventionError(
                f"{_where(path)} was never called during the forward, so its {kind} does not exist "
                "(was the forward stopped early, or does the model not use this module?)", source=node.source)
        return OrderError("this line could not run: it needs a value that the forward never produced",
                          source=node.source)


_E = TypeVar("_E", bound=SandboxError)


def _blamed(error: _E, node_id: int) -> _E:
    error.node_id = node_id
    return error


def _where(path: str) -> str:
    return f"module {path!r}" if path else "the model"


def _resolve(value: Any, values: dict[int, Any]) -> Any:
    if type(value) is Ref:            # the common case per argument: no closure, no walk
        return values[value.id]
    return map_leaves(value, lambda v: values[v.id] if isinstance(v, Ref) else v)


__all__ = ["ALL", "Executor", "StopForward", "torch"]
