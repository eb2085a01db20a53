"""Proxies: stand-ins for values that exist only when the graph runs. Every use records a node.

    with lm.trace("Hello") as tracer:
        h = lm.model.layers[0].output      # a Proxy
        top = h.softmax(-1).topk(3)        # records call_method nodes
        top.save()
    top.value                              # the real result, after the block

Operators, indexing, tensor methods and torch functions (via ``__torch_function__``) are
recorded; converting a proxy to a Python bool/int/float is refused, since its value does
not exist yet.
"""
from __future__ import annotations

import operator
from collections.abc import Callable, Iterator
from typing import TYPE_CHECKING, Any, Protocol

from .errors import TraceError, ValueNotReadyError
from .interpreter.targets import TENSOR_DUNDERS, target_name, tensor_method

if TYPE_CHECKING:
    from .graph import Node

_OWN = frozenset({"_tracer", "_id"})


class Recorder(Protocol):
    """What proxies and envoys record into (a ``Tracer``)."""

    nodes: list[Node]

    def record(self, op: str, target: str | None, args: tuple[Any, ...],
               kwargs: dict[str, Any] | None = None, *, after: tuple[int, ...] = ()) -> Proxy: ...

    def record_event(self, op: str, path: str, args: tuple[Any, ...] = ()) -> Proxy: ...

    def record_mutation(self, op: str, target: str | None, args: tuple[Any, ...], mutated: Proxy) -> Proxy: ...

    def record_method(self, name: str, obj: Any, args: tuple[Any, ...], kwargs: dict[str, Any]) -> Proxy: ...

    def record_call(self, callee: Proxy, args: tuple[Any, ...], kwargs: dict[str, Any]) -> Proxy: ...

    def record_grad(self, proxy: Proxy) -> Proxy: ...

    def record_set_grad(self, proxy: Proxy, value: Any) -> None: ...

    def length_of(self, proxy: Proxy) -> int: ...

    def result_of(self, node_id: int) -> Any: ...


class Proxy:
    """A recorded value: node ``_id`` of ``_tracer``'s graph."""

    __slots__ = ("_tracer", "_id")
    _tracer: Recorder
    _id: int

    def __init__(self, tracer: Recorder, node_id: int) -> None:
        object.__setattr__(self, "_tracer", tracer)
        object.__setattr__(self, "_id", node_id)

    # ----- results -------------------------------------------------------------------------
    def save(self) -> Proxy:
        """Keep this value after the trace; read it with ``.value``."""
        self._tracer.record("save", None, (self,))
        return self

    @property
    def value(self) -> Any:
        """The real value once the trace has run (saved values only)."""
        return self._tracer.result_of(self._id)

    def __repr__(self) -> str:
        node = self._tracer.nodes[self._id]
        try:
            shown = repr(self.value)
        except ValueNotReadyError:
            shown = "<not run yet>"
        return f"Proxy(node {self._id}: {node.op} {node.target or ''}) = {shown}"

    # ----- recording -------------------------------------------------------------------------
    def __getattr__(self, name: str) -> Proxy:
        if name.startswith("__"):
            raise AttributeError(name)
        if name == "grad":
            return self._tracer.record_grad(self)
        return self._tracer.record("getattr", name, (self,))

    def __setattr__(self, name: str, value: Any) -> None:
        if name in _OWN:
            object.__setattr__(self, name, value)
        elif name == "grad":
            self._tracer.record_set_grad(self, value)
        else:
            raise TraceError(f"cannot set attribute {name!r} on a traced value; only '.grad' can be assigned")

    def __call__(self, *args: Any, **kwargs: Any) -> Proxy:
        return self._tracer.record_call(self, args, kwargs)

    def __getitem__(self, index: Any) -> Proxy:
        return self._tracer.record("getitem", None, (self, index))

    def __setitem__(self, index: Any, value: Any) -> None:
        self._tracer.record_mutation("setitem", None, (self, index, value), mutated=self)

    def __iter__(self) -> Iterator[Proxy]:
        length = self._tracer.length_of(self)
        return (self[i] for i in range(length))

    def __len__(self) -> int:
        return self._tracer.length_of(self)

    def __bool__(self) -> bool:
        raise TraceError(
            "a traced value has no truth value while recording (its value does not exist yet); "
            "compute the condition with tensor operations (torch.where) or use sandbox_client.apply"
        )

    def __index__(self) -> int:
        raise TraceError("a traced value cannot be used as a Python int while recording")

    def __float__(self) -> float:
        raise TraceError("a traced value cannot be converted to float while recording")

    def __int__(self) -> int:
        raise TraceError("a traced value cannot be converted to int while recording")

    __hash__ = object.__hash__

    @classmethod
    def __torch_function__(cls, func: Callable[..., Any], types: Any, args: Any = (), kwargs: Any = None) -> Any:
        kwargs = kwargs or {}
        tracer = _find_tracer(args, kwargs)
        name = getattr(func, "__name__", "")
        if name in TENSOR_DUNDERS:
            op, swap = TENSOR_DUNDERS[name]
            return tracer.record("call_function", f"operator.{op.__name__}", tuple(reversed(args)) if swap else args)
        qualified = target_name(func)
        if qualified is not None:
            return tracer.record("call_function", qualified, args, kwargs)
        if tensor_method(name):
            return tracer.record_method(name, args[0], args[1:], kwargs)
        raise TraceError(f"torch function {getattr(func, '__qualname__', func)!r} cannot be used on traced values")


def _find_tracer(args: Any, kwargs: dict[str, Any]) -> Recorder:
    stack: list[Any] = [args, kwargs]
    while stack:
        item = stack.pop()
        if isinstance(item, Proxy):
            return item._tracer
        if isinstance(item, (list, tuple)):
            stack.extend(item)
        elif isinstance(item, dict):
            stack.extend(item.values())
    raise TraceError("no traced value among the arguments")


def _binary(op: Callable[..., Any], reflected: bool = False) -> Callable[[Proxy, Any], Proxy]:
    name = f"operator.{op.__name__}"

    def method(self: Proxy, other: Any) -> Proxy:
        args = (other, self) if reflected else (self, other)
        return self._tracer.record("call_function", name, args)

    return method


def _unary(op: Callable[..., Any]) -> Callable[[Proxy], Proxy]:
    name = f"operator.{op.__name__}"

    def method(self: Proxy) -> Proxy:
        return self._tracer.record("call_function", name, (self,))

    return method


for _dunder, _fn in {
    "add": operator.add, "sub": operator.sub, "mul": operator.mul, "truediv": operator.truediv,
    "floordiv": operator.floordiv, "mod": operator.mod, "pow": operator.pow, "matmul": operator.matmul,
    "and": operator.and_, "or": operator.or_, "xor": operator.xor,
}.items():
    setattr(Proxy, f"__{_dunder}__", _binary(_fn))
    setattr(Proxy, f"__r{_dunder}__", _binary(_fn, reflected=True))
for _dunder, _fn in {"lt": operator.lt, "le": operator.le, "gt": operator.gt, "ge": operator.ge,
                     "eq": operator.eq, "ne": operator.ne}.items():
    setattr(Proxy, f"__{_dunder}__", _binary(_fn))
_UNARY: dict[str, Callable[[Any], Any]] = {"neg": operator.neg, "pos": operator.pos, "abs": operator.abs,
                                          "invert": operator.invert}
for _dunder, _ufn in _UNARY.items():
    setattr(Proxy, f"__{_dunder}__", _unary(_ufn))
