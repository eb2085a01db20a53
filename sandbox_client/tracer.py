"""The recording context: ``with model.trace(...) as tracer`` builds a Graph, then runs it.

    with lm.trace() as tracer:
        with tracer.invoke("The Eiffel Tower is in the city of"):
            clean = lm.model.layers[8].output[:, -1].save()
        with tracer.invoke("The Colosseum is in the city of"):
            lm.model.layers[8].output[:, -1] = clean
            logits = lm.output.logits.save()

Nothing runs inside the block. On exit the finished graph goes to the trace's ``Backend``
(``sandbox_client.types``): local execution, a server (``remote=True``), or a shape-only scan;
saved values are then available as ``proxy.value``.
"""
from __future__ import annotations

import contextlib
import contextvars
from collections.abc import Iterator
from typing import Any

import torch

from .envoy import Envoy
from .errors import TraceError, ValueNotReadyError
from .graph import Graph, Invoke, Node, Ref, Step
from .graph.walk import leaves
from .interpreter.targets import tensor_method
from .proxy import Proxy
from .sourceinfo import user_source
from .types import Backend, Results, TraceHost

_ROUNDTRIP: contextvars.ContextVar[bool] = contextvars.ContextVar("sandbox_roundtrip", default=False)
_CURRENT: contextvars.ContextVar[Tracer | None] = contextvars.ContextVar("sandbox_tracer", default=None)


def current_tracer() -> Tracer | None:
    """The innermost open trace in this thread/context, if any."""
    return _CURRENT.get()


@contextlib.contextmanager
def json_roundtrip() -> Iterator[None]:
    """While active, every trace runs ``Graph.from_json(graph.to_json())``: the exact wire path.

        with sc.json_roundtrip():
            with lm.trace("hi"): ...
    """
    token = _ROUNDTRIP.set(True)
    try:
        yield
    finally:
        _ROUNDTRIP.reset(token)


class Tracer:
    """Records one trace or generation. Created by ``Model.trace`` / ``LanguageModel.generate``; on exit
    ``backend.run(graph)`` runs it (a ``RemoteBackend`` leaves the server job in ``tracer.job``)."""

    def __init__(self, host: TraceHost, kind: str, args: tuple[Any, ...], kwargs: dict[str, Any],
                 options: dict[str, Any] | None = None, *, backend: Backend) -> None:
        self.host: TraceHost | None = host   # host and backend are dropped after the run: kept results
        self.backend: Backend | None = backend   # must not pin the model
        self.job: Any = None                 # a remote trace's RemoteJob (status, wait, cancel), once submitted
        self.kind = kind
        self.nodes: list[Node] = []
        self.invokes: list[Invoke] = []
        self.options = dict(options or {})
        self._invoke: int | None = None
        self._step: Step = 0
        self._mutations: dict[int, int] = {}   # node id -> last node that mutated its value in place
        self._events_written: dict[tuple[str, str, Step, int | None], int] = {}
        self._results: Results | None = None
        self._failed: BaseException | None = None
        if args or kwargs:
            self.invokes.append(Invoke(tuple(_literal(a) for a in args), {k: _literal(v) for k, v in kwargs.items()}))
            self._invoke = 0

    # ----- context -------------------------------------------------------------------------
    def __enter__(self) -> Tracer:
        self._host().open_trace(self)
        self._token = _CURRENT.set(self)
        return self

    def __exit__(self, exc_type: Any, exc: Any, tb: Any) -> None:
        self._host().close_trace(self)
        _CURRENT.reset(self._token)
        self.host = None
        backend, self.backend = self.backend, None
        if exc_type is not None:
            self._failed = exc
            return
        if not self.invokes:
            raise TraceError("the trace has no input: pass one to trace(...) or use tracer.invoke(...)")
        graph = self.graph
        if _ROUNDTRIP.get():
            graph = Graph.from_json(graph.to_json())
        assert backend is not None
        try:
            self._results = backend.run(graph)
        except BaseException as err:
            self._failed = err
            raise
        finally:
            self.job = getattr(backend, "job", None)

    @property
    def graph(self) -> Graph:
        """The recorded graph (a snapshot)."""
        return Graph(kind=self.kind, invokes=list(self.invokes), nodes=list(self.nodes), options=dict(self.options))

    @contextlib.contextmanager
    def invoke(self, *args: Any, **kwargs: Any) -> Iterator[Tracer]:
        """Add one input to the batch; nodes recorded inside see only its rows."""
        if self._in_invoke:
            raise TraceError("invokes cannot be nested: close one `with tracer.invoke(...)` before the next")
        previous = self._invoke
        self.invokes.append(Invoke(tuple(_literal(a) for a in args), {k: _literal(v) for k, v in kwargs.items()}))
        self._invoke = len(self.invokes) - 1
        self._in_invoke = True
        try:
            yield self
        finally:
            self._invoke = previous
            self._in_invoke = False

    _in_invoke = False

    @contextlib.contextmanager
    def step(self, index: int) -> Iterator[Tracer]:
        """Bind nodes recorded inside to the ``index``-th forward call (0 = the prompt)."""
        if not isinstance(index, int) or index < 0:
            raise TraceError(f"step index must be a non-negative int, got {index!r}")
        with self._stepping(index):
            yield self

    @contextlib.contextmanager
    def all_steps(self) -> Iterator[Tracer]:
        """Bind nodes recorded inside to every forward call; ``.save()`` inside gives a list per step."""
        with self._stepping("all"):
            yield self

    @contextlib.contextmanager
    def _stepping(self, step: Step) -> Iterator[None]:
        if self.kind != "generate" and step != 0:
            raise TraceError("tracer.step()/all_steps() only apply to model.generate(...)")
        previous, self._step = self._step, step
        try:
            yield
        finally:
            self._step = previous

    def stop(self) -> None:
        """Stop the model's forward as soon as every recorded node has run."""
        self.record("stop", None, ())

    @property
    def result(self) -> Proxy:
        """The generated token ids (generate only)."""
        if self.kind != "generate":
            raise TraceError("tracer.result exists only inside model.generate(...)")
        return self.record("result", None, ())

    # ----- recording -------------------------------------------------------------------------
    def record(self, op: str, target: str | None, args: tuple[Any, ...],
               kwargs: dict[str, Any] | None = None, *, after: tuple[int, ...] = ()) -> Proxy:
        """Append a node and return a proxy for its value."""
        if self._results is not None or self._failed is not None:
            self._check_open()
        ref = self._ref
        enc_args = tuple([ref(a) for a in args]) if args else ()
        enc_kwargs = {k: ref(v) for k, v in kwargs.items()} if kwargs else {}
        if self._mutations:
            deps = set(after)
            _mutations_of(enc_args, self._mutations, deps)
            _mutations_of(enc_kwargs, self._mutations, deps)
            after = tuple(sorted(deps))
        node_id = len(self.nodes)
        self.nodes.append(Node(node_id, op, target, enc_args, enc_kwargs, self._invoke, self._step, after,
                               user_source()))
        return Proxy(self, node_id)

    def record_event(self, op: str, path: str, args: tuple[Any, ...] = ()) -> Proxy:
        """A node bound to a module event; reads come after earlier writes of the same event."""
        key = (path, op.removeprefix("set_"), self._step, self._invoke)
        if op in ("output", "input", "inputs"):
            prior = self._events_written.get(key) or self._events_written.get((path, op, self._step, None))
            return self.record(op, path, args, after=(prior,) if prior is not None else ())
        proxy = self.record(op, path, args)
        self._events_written[key] = proxy._id
        return proxy

    def record_mutation(self, op: str, target: str | None, args: tuple[Any, ...], mutated: Proxy) -> Proxy:
        proxy = self.record(op, target, args)
        self._mutations[mutated._id] = proxy._id
        node = self.nodes[mutated._id]
        if node.op in ("output", "input") and node.target is not None:
            self._events_written[(node.target, node.op, node.step, node.invoke)] = proxy._id
        return proxy

    def record_method(self, name: str, obj: Any, args: tuple[Any, ...], kwargs: dict[str, Any]) -> Proxy:
        if name.endswith("_") and isinstance(obj, Proxy):
            return self.record_mutation("call_method", name, (obj, *args), mutated=obj)
        return self.record("call_method", name, (obj, *args), kwargs)

    def record_call(self, callee: Proxy, args: tuple[Any, ...], kwargs: dict[str, Any]) -> Proxy:
        """``proxy.method(...)``: turn the just-recorded getattr into a method call."""
        node = self.nodes[callee._id]
        if node.op != "getattr" or not tensor_method(node.target or ""):
            raise TraceError(f"this traced value is not callable (node {callee._id}: {node.op})")
        if callee._id == len(self.nodes) - 1:
            self.nodes.pop()
        obj = node.args[0]
        owner = Proxy(self, obj.id) if isinstance(obj, Ref) else obj
        return self.record_method(node.target or "", owner, args, kwargs)

    def record_grad(self, proxy: Proxy) -> Proxy:
        self._check_grad_target(proxy)
        return self.record("grad", None, (proxy,))

    def record_set_grad(self, proxy: Proxy, value: Any) -> None:
        self._check_grad_target(proxy)
        self.record("set_grad", None, (proxy, value))

    def _check_grad_target(self, proxy: Proxy) -> None:
        if self.nodes[proxy._id].op != "output":
            raise TraceError("'.grad' is available on a module's '.output' only, e.g. layer.output.grad")

    def length_of(self, proxy: Proxy) -> int:
        """Length of a proxy's value, for tuple unpacking; known for module outputs and topk-like calls."""
        length = self._host().value_length(self.nodes[proxy._id], self)
        if length is None:
            raise TraceError("cannot unpack this traced value: its length is unknown while recording; "
                             "index it explicitly (x[0], x[1])")
        return length

    def _ref(self, value: Any) -> Any:
        if type(value) is Proxy and value._tracer is self:
            return Ref(value._id)
        if isinstance(value, Proxy):
            if value._tracer is self:
                return Ref(value._id)
            return _literal(value.value)  # a saved value from an earlier trace
        if isinstance(value, list):
            return [self._ref(v) for v in value]
        if isinstance(value, tuple) and not hasattr(value, "_fields"):
            return tuple(self._ref(v) for v in value)
        if isinstance(value, dict):
            return {k: self._ref(v) for k, v in value.items()}
        if isinstance(value, slice):
            return slice(self._ref(value.start), self._ref(value.stop), self._ref(value.step))
        return _literal(value)

    def _host(self) -> TraceHost:
        if self.host is None:
            raise TraceError("this trace has already run; start a new `with model.trace(...)` block")
        return self.host

    def _check_open(self) -> None:
        if self._results is not None or self._failed is not None:
            raise TraceError("this trace has already run; start a new `with model.trace(...)` block")

    # ----- results ---------------------------------------------------------------------------
    def result_of(self, node_id: int) -> Any:
        if self._results is None:
            if self._failed is not None:
                raise ValueNotReadyError("the trace failed, so no values were computed: see the earlier error")
            raise ValueNotReadyError(".value is available only after the `with` block has ended")
        if node_id not in self._results:
            raise ValueNotReadyError("this value was not saved: call .save() on it inside the trace")
        return self._results[node_id]


def _literal(value: Any) -> Any:
    """A user value embedded in the graph. Tensors are made contiguous, exactly as the wire format
    stores them, so a local run computes bit for bit what a remote run of the same graph computes."""
    if isinstance(value, torch.Tensor):
        return value.contiguous()
    if isinstance(value, Envoy):
        raise TraceError("a module cannot be passed as a value; call it instead: lm.lm_head(x)")
    return value


def _mutations_of(value: Any, mutations: dict[int, int], deps: set[int]) -> None:
    for v in leaves(value):
        if isinstance(v, Ref) and v.id in mutations:
            deps.add(mutations[v.id])
