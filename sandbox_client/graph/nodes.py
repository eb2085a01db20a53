"""The intervention graph: typed nodes in recording order, plus the inputs of each invoke.

    >>> g = Graph.from_json(tracer.graph.to_json())      # exact round trip
    >>> [n.op for n in g.nodes][:2]
    ['output', 'save']

A node's ``args``/``kwargs`` hold literals and ``Ref``s to earlier nodes. Nodes bound to a
model event (reading or writing a module's input/output, a gradient, a skip) name the
module ``path``; ``invoke`` picks the batch rows a node sees (None: the whole batch) and
``step`` the generation step (an int, or ``"all"`` for every step).
"""
from __future__ import annotations

import json
from dataclasses import dataclass, field
from typing import Any, Literal

from .values import GraphFormatError, Ref, decode_value, encode_value
from .walk import leaves

FORMAT_VERSION = 1
Step = int | Literal["all"]

#: op -> what it does (the format's complete list of operations)
OPS: dict[str, str] = {
    "output": "read a module's output (path '' is the model's return value)",
    "input": "read a module's first positional argument",
    "inputs": "read a module's (args, kwargs)",
    "set_output": "replace a module's output with args[0]",
    "set_input": "replace a module's first positional argument with args[0]",
    "skip": "do not run the module; its output is args[0]",
    "grad": "the gradient flowing into the value of args[0] (an output read)",
    "set_grad": "replace the gradient flowing into args[0] with args[1]",
    "call_function": "call the allowlisted function named by target",
    "call_method": "call method target on args[0]",
    "call_module": "call the submodule at target ad hoc",
    "getattr": "attribute target of args[0]",
    "getitem": "args[0][args[1]]",
    "setitem": "args[0][args[1]] = args[2] (in place)",
    "param": "a parameter or buffer of the model, by dotted name",
    "apply": "call the user function whose source is target (compiled with RestrictedPython)",
    "save": "keep the value of args[0] for the user",
    "stop": "stop the forward once every other node has run",
    "result": "the generated token ids (generate only)",
}
EVENT_OPS = frozenset({"output", "input", "inputs", "set_output", "set_input", "skip"})
GRAD_OPS = frozenset({"grad", "set_grad"})
KINDS = ("trace", "generate")


@dataclass(eq=False, slots=True)
class Node:
    """One recorded operation. ``source`` is the user's line that created it.

    Treat nodes as immutable once recorded (they are shared by graph snapshots). Not a frozen
    dataclass only because recording creates one per traced operation and a frozen __init__
    costs 5x more.
    """

    id: int
    op: str
    target: str | None = None
    args: tuple[Any, ...] = ()
    kwargs: dict[str, Any] = field(default_factory=dict)
    invoke: int | None = None
    step: Step = 0
    after: tuple[int, ...] = ()
    source: str = ""
    _refs: tuple[int, ...] | None = field(default=None, init=False, repr=False)

    def refs(self) -> tuple[int, ...]:
        """Ids of every node this one needs, explicit (args) and ordering-only (after). Computed once."""
        if self._refs is None:
            found: list[int] = []
            _collect_refs(self.args, found)
            _collect_refs(self.kwargs, found)
            found.extend(self.after)
            self._refs = tuple(dict.fromkeys(found))
        return self._refs

    def to_dict(self) -> dict[str, Any]:
        return {
            "id": self.id, "op": self.op, "target": self.target,
            "args": [encode_value(a) for a in self.args],
            "kwargs": encode_value(self.kwargs)["$dict"],
            "invoke": self.invoke, "step": self.step, "after": list(self.after), "source": self.source,
        }

    @classmethod
    def from_dict(cls, data: Any) -> Node:
        if not isinstance(data, dict):
            raise GraphFormatError("each node must be a JSON object")
        extra = set(data) - _NODE_FIELDS
        missing = _NODE_FIELDS - set(data)
        if extra or missing:
            raise GraphFormatError(f"node fields wrong: unknown {sorted(extra)}, missing {sorted(missing)}")
        op = _expect(data["op"], str, "op")
        if op not in OPS:
            raise GraphFormatError(f"unknown op {op!r}; known ops: {', '.join(OPS)}")
        target = data["target"]
        if target is not None and not isinstance(target, str):
            raise GraphFormatError("node 'target' must be a string or null")
        args = data["args"]
        if not isinstance(args, list):
            raise GraphFormatError("node 'args' must be a list")
        invoke = data["invoke"]
        if invoke is not None and not _is_int(invoke):
            raise GraphFormatError("node 'invoke' must be an integer or null")
        step = data["step"]
        if not (_is_int(step) or step == "all"):
            raise GraphFormatError("node 'step' must be an integer or 'all'")
        after = data["after"]
        if not isinstance(after, list) or not all(_is_int(a) for a in after):
            raise GraphFormatError("node 'after' must be a list of node ids")
        return cls(
            id=_expect_int(data["id"], "id"), op=op, target=target,
            args=tuple(decode_value(a) for a in args),
            kwargs=decode_value({"$dict": data["kwargs"]}),
            invoke=invoke, step=step, after=tuple(after),
            source=_expect(data["source"], str, "source"),
        )


@dataclass(frozen=True, eq=False)
class Invoke:
    """The input of one invoke: positional and keyword arguments, as the user gave them."""

    args: tuple[Any, ...] = ()
    kwargs: dict[str, Any] = field(default_factory=dict)


@dataclass(eq=False)
class Graph:
    """A recorded intervention graph: what to run (``kind``), on which inputs, doing what.

    ``options`` holds the run's keyword options (e.g. ``max_new_tokens`` for generate).
    """

    kind: str = "trace"
    invokes: list[Invoke] = field(default_factory=list)
    nodes: list[Node] = field(default_factory=list)
    options: dict[str, Any] = field(default_factory=dict)
    version: int = FORMAT_VERSION

    def __eq__(self, other: object) -> bool:
        return isinstance(other, Graph) and self.to_json() == other.to_json()

    def __hash__(self) -> int:
        return hash(self.to_json())

    def to_json(self) -> str:
        """The wire format: compact JSON, deterministic, no pickle."""
        doc = {
            "version": self.version,
            "kind": self.kind,
            "options": encode_value(self.options)["$dict"],
            "invokes": [
                {"args": [encode_value(a) for a in inv.args], "kwargs": encode_value(inv.kwargs)["$dict"]}
                for inv in self.invokes
            ],
            "nodes": [n.to_dict() for n in self.nodes],
        }
        return json.dumps(doc, separators=(",", ":"), allow_nan=False, ensure_ascii=True)

    @classmethod
    def from_json(cls, text: str | bytes) -> Graph:
        """Parse the wire format; any malformed input raises GraphFormatError (never anything else)."""
        try:
            doc = json.loads(text, parse_constant=_refuse_constant)
            return cls._from_doc(doc)
        except GraphFormatError:
            raise
        except RecursionError:
            raise GraphFormatError("the graph JSON is nested too deeply") from None
        except (ValueError, TypeError, UnicodeDecodeError) as exc:
            raise GraphFormatError(f"not valid graph JSON: {exc}") from None

    @classmethod
    def _from_doc(cls, doc: Any) -> Graph:
        if not isinstance(doc, dict):
            raise GraphFormatError("a graph must be a JSON object")
        extra = set(doc) - _GRAPH_FIELDS
        missing = _GRAPH_FIELDS - set(doc)
        if extra or missing:
            raise GraphFormatError(f"graph fields wrong: unknown {sorted(extra)}, missing {sorted(missing)}")
        if doc["version"] != FORMAT_VERSION or not _is_int(doc["version"]):
            raise GraphFormatError(
                f"graph format version {doc['version']!r} is not supported; this side speaks version "
                f"{FORMAT_VERSION}: upgrade the older of client and server"
            )
        if doc["kind"] not in KINDS:
            raise GraphFormatError(f"graph kind must be one of {KINDS}, got {doc['kind']!r}")
        if not isinstance(doc["invokes"], list) or not isinstance(doc["nodes"], list):
            raise GraphFormatError("'invokes' and 'nodes' must be lists")
        invokes = [_invoke_from_dict(i) for i in doc["invokes"]]
        nodes = [Node.from_dict(n) for n in doc["nodes"]]
        for index, node in enumerate(nodes):
            if node.id != index:
                raise GraphFormatError(f"node ids must be 0, 1, 2, ... in order; node {index} has id {node.id}")
        return cls(kind=doc["kind"], invokes=invokes, nodes=nodes,
                   options=decode_value({"$dict": doc["options"]}), version=doc["version"])


_NODE_FIELDS = frozenset({"id", "op", "target", "args", "kwargs", "invoke", "step", "after", "source"})
_GRAPH_FIELDS = frozenset({"version", "kind", "options", "invokes", "nodes"})


def _invoke_from_dict(data: Any) -> Invoke:
    if not isinstance(data, dict) or set(data) != {"args", "kwargs"} or not isinstance(data["args"], list):
        raise GraphFormatError("each invoke must be an object with 'args' (a list) and 'kwargs'")
    return Invoke(args=tuple(decode_value(a) for a in data["args"]),
                  kwargs=decode_value({"$dict": data["kwargs"]}))


def _collect_refs(value: Any, found: list[int]) -> None:
    found.extend(v.id for v in leaves(value) if isinstance(v, Ref))


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _expect(value: Any, kind: type, name: str) -> Any:
    if not isinstance(value, kind):
        raise GraphFormatError(f"node field {name!r} must be of type {kind.__name__}")
    return value


def _expect_int(value: Any, name: str) -> int:
    if not _is_int(value):
        raise GraphFormatError(f"node field {name!r} must be an integer")
    return int(value)


def _refuse_constant(name: str) -> Any:
    raise GraphFormatError(f"bare {name} is not valid JSON; encode special floats as {{'$float': 'nan'}}")
