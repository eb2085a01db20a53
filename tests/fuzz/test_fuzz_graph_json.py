"""Property fuzzing of the request path: every byte sequence gets a Graph/ValidatedGraph or a typed error.

Inputs: random JSON-ish documents (some shaped like graphs), structural mutations of graphs recorded
with sandbox_client (drop, duplicate, replace, retype fields; edge numbers; hostile ops and names),
text mutations (truncation, random bytes), and user-function sources for ``apply`` nodes. The outcome
rule is graph_fuzz.check_outcome, with and without a dry run on meta tensors. Derandomized: the same
examples on every run (6,700 in all), each under a 1 s deadline.
Crashes they found are pinned, minimal, in ``REPRODUCERS``.
"""
from __future__ import annotations

import copy
import json
from collections.abc import Callable
from typing import Any

import pytest
import torch
from graph_corpus import recorded_graphs, tiny_model
from graph_fuzz import EDGE_NUMBERS, FORMAT_KEYS, FUNCTIONS, OPS_POOL, TARGETS, check_outcome
from hypothesis import HealthCheck, given, note, settings
from hypothesis import strategies as st

from sandbox_client.interpreter import DryRun, ShapeTemplate, meta_copy

FUZZ = settings(deadline=1000, derandomize=True, database=None, print_blob=True,
                suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large,
                                       HealthCheck.large_base_example, HealthCheck.filter_too_much])

TEXTS, SPEC = recorded_graphs()
SEEDS = sorted(TEXTS)
#: validate_and_dry_run(dry=...) also runs the nodes on meta tensors: a second, larger surface
DRY = DryRun(ShapeTemplate.probe(tiny_model(), lambda b, t: {"input_ids": torch.randint(0, 50257, (b, t))}),
             meta_copy(tiny_model()), seq=6)

# ---- strategies ------------------------------------------------------------------------------------

scalars = st.one_of(
    st.none(), st.booleans(), st.integers(min_value=-(2**70), max_value=2**70), st.floats(),
    st.text(max_size=6), st.sampled_from(EDGE_NUMBERS), st.sampled_from(TARGETS), st.sampled_from(FORMAT_KEYS),
)
keys = st.one_of(st.sampled_from(FORMAT_KEYS), st.text(max_size=4))
json_values = st.recursive(
    scalars,
    lambda inner: st.one_of(
        st.lists(inner, max_size=3),
        st.dictionaries(keys, inner, max_size=2),
        st.builds(lambda tag, body: {tag: body}, st.sampled_from(FORMAT_KEYS), inner),   # tagged values
        st.builds(lambda k, v: [[k, v]], keys, inner),                                    # $dict pairs
    ),
    max_leaves=6,
)
wire_scalars = st.one_of(st.none(), st.booleans(), st.integers(-3, 40), st.sampled_from(EDGE_NUMBERS),
                         st.floats(allow_nan=False, allow_infinity=False), st.sampled_from(TARGETS))
#: well-formed encoded values (the decoder accepts them), so that mutations get past the format check
wire_values = st.recursive(
    wire_scalars,
    lambda inner: st.one_of(
        st.lists(inner, max_size=3),
        st.builds(lambda v: {"$tuple": v}, st.lists(inner, max_size=3)),
        st.builds(lambda v: {"$slice": v}, st.lists(inner, min_size=3, max_size=3)),
        st.builds(lambda k, v: {"$dict": [[k, v]]}, keys, inner),
        st.sampled_from([{"$ellipsis": True}, {"$dtype": "float16"}, {"$dtype": "int64"}, {"$device": "cpu"},
                         {"$device": "cuda"}, {"$float": "nan"}, {"$float": "-inf"}, {"$size": [2, 3]}]),
        st.builds(lambda i: {"$ref": i}, st.integers(0, 30)),
    ),
    max_leaves=5,
)
pairs = st.one_of(st.just([]), st.builds(lambda k, v: [[k, v]], st.one_of(keys, scalars), json_values))

nodes = st.fixed_dictionaries(
    {"id": st.integers(min_value=-2, max_value=40), "op": st.sampled_from(OPS_POOL),
     "target": st.one_of(st.none(), st.sampled_from(TARGETS)), "args": st.lists(json_values, max_size=3),
     "kwargs": pairs, "invoke": st.one_of(st.none(), st.integers(-1, 3)),
     "step": st.one_of(st.integers(-1, 30), st.just("all")), "after": st.lists(st.integers(-1, 40), max_size=2),
     "source": st.text(max_size=8)},
    optional={"extra": scalars},
)


def _numbered(doc: Any, renumber: bool) -> Any:
    if renumber and isinstance(doc, dict) and isinstance(doc.get("nodes"), list):
        for index, node in enumerate(doc["nodes"]):
            if isinstance(node, dict):
                node["id"] = index
    return doc


graph_shaped = st.builds(
    _numbered,
    st.fixed_dictionaries(
        {"version": st.sampled_from([1, 1, 1, 0, 2, "1", 1.0, True, None]),
         "kind": st.sampled_from(["trace", "trace", "generate", "train", "", None]),
         "options": st.one_of(pairs, st.sampled_from(EDGE_NUMBERS).map(lambda v: [["max_new_tokens", v]])),
         "invokes": st.lists(st.fixed_dictionaries({"args": st.lists(json_values, max_size=2), "kwargs": pairs}),
                             max_size=2),
         "nodes": st.lists(nodes, max_size=4)},
        optional={"extra": scalars},
    ),
    st.booleans(),
)


def dumps(doc: Any) -> str:
    return json.dumps(doc)   # NaN/Infinity tokens allowed here on purpose: the reader must refuse them


# ---- random documents -------------------------------------------------------------------------------

@settings(FUZZ, max_examples=1500)
@given(doc=st.one_of(json_values, graph_shaped, graph_shaped), as_bytes=st.booleans())
def test_random_documents(doc: Any, as_bytes: bool) -> None:
    text = dumps(doc)
    note(f"input: {text[:3000]!r}")
    check_outcome(text.encode() if as_bytes else text, SPEC)


# ---- structural mutations of recorded graphs ---------------------------------------------------------

Slot = tuple[Any, Any]   # (container, key or index)
OPTION_NAMES = ("max_new_tokens", "do_sample", "temperature", "top_k", "num_beams", "output_hidden_states")
ACTIONS = ("drop", "duplicate", "replace", "retype", "edge", "top", "node", "node", "args", "call", "option")
KWARG_NAMES = ("dim", "dtype", "device", "size", "steps", "out", "retain_graph", "copy", "keepdim", "")
numbers = st.one_of(st.sampled_from(EDGE_NUMBERS), st.integers(-(10**400), 10**400), st.floats())


def _inner_slots(doc: Any) -> list[Slot]:
    """Every (container, key) below the document's own fields (those are the "top" action's)."""
    found: list[Slot] = []
    stack = list(doc.values()) if isinstance(doc, dict) else [doc]
    while stack:
        value = stack.pop()
        items = value.items() if isinstance(value, dict) else enumerate(value) if isinstance(value, list) else ()
        for key, child in items:
            found.append((value, key))
            stack.append(child)
    return found


def _retype(value: Any) -> Any:
    if isinstance(value, bool):
        return int(value)
    if isinstance(value, int):
        return str(value)
    if isinstance(value, float):
        return [value]
    if isinstance(value, str):
        return {"$tuple": [value]}
    if isinstance(value, list):
        return {"$dict": value} if value and not isinstance(value[0], list) else {"k": value}
    if isinstance(value, dict):
        return list(value.items())
    return 0


def _draw(data: st.DataObject, strategy: st.SearchStrategy[Any]) -> Any:
    """A fresh copy: drawn pool entries (lists, dicts) are shared objects, and later mutations edit in place."""
    return copy.deepcopy(data.draw(strategy))


def _change_slot(container: Any, key: Any, action: str, data: st.DataObject) -> None:
    if action == "drop":
        del container[key]
    elif action == "duplicate" and isinstance(container, list):
        container.insert(data.draw(st.integers(0, len(container))), copy.deepcopy(container[key]))
    elif action == "duplicate":
        container[_draw(data, keys)] = copy.deepcopy(container[key])
    elif action == "replace":
        container[key] = _draw(data, st.one_of(wire_values, json_values))
    elif action == "retype":
        container[key] = _retype(container[key])
    else:
        container[key] = _draw(data, st.sampled_from(EDGE_NUMBERS))


def _mutate(doc: Any, data: st.DataObject) -> None:
    """One random change, in place: a field anywhere, a node's op/target/binding, a call, the options."""
    action = _draw(data, st.sampled_from(ACTIONS))
    nodes = doc.get("nodes") if isinstance(doc, dict) else None
    nodes = [n for n in nodes if isinstance(n, dict)] if isinstance(nodes, list) else []
    if action == "option" and isinstance(doc, dict):
        doc["options"] = [[_draw(data, st.one_of(st.sampled_from(OPTION_NAMES), keys)),
                           _draw(data, st.one_of(numbers, json_values))]]
    elif action == "call" and nodes:
        node = nodes[data.draw(st.integers(0, len(nodes) - 1))]
        node.update(op="call_function", target=_draw(data, st.sampled_from(FUNCTIONS)), kwargs=[],
                    args=_draw(data, st.lists(numbers, min_size=1, max_size=3)))
    elif action == "args" and nodes:
        node = nodes[data.draw(st.integers(0, len(nodes) - 1))]
        node["args"] = _draw(data, st.lists(wire_values, max_size=4))
        node["kwargs"] = _draw(data, st.lists(st.tuples(st.sampled_from(KWARG_NAMES), wire_values).map(list),
                                              max_size=2))
    elif action == "node" and nodes:
        node = nodes[data.draw(st.integers(0, len(nodes) - 1))]
        field = _draw(data, st.sampled_from(["op", "target", "both", "step", "invoke", "after"]))
        if field in ("op", "both"):
            node["op"] = _draw(data, st.sampled_from(OPS_POOL))
        if field in ("target", "both"):
            node["target"] = _draw(data, st.sampled_from(TARGETS))
        if field in ("step", "invoke", "after"):
            node[field] = _draw(data, st.sampled_from(EDGE_NUMBERS))
    elif action == "top" and isinstance(doc, dict) and doc:
        key = _draw(data, st.sampled_from(sorted(doc)))
        _change_slot(doc, key, _draw(data, st.sampled_from(ACTIONS[:5])), data)
    else:
        slots = _inner_slots(doc)
        if slots:
            container, key = slots[data.draw(st.integers(0, len(slots) - 1))]
            _change_slot(container, key, action if action in ACTIONS[:5] else "replace", data)


@settings(FUZZ, max_examples=2500)
@given(seed=st.sampled_from(SEEDS), count=st.integers(1, 4), renumber=st.booleans(), data=st.data())
def test_mutated_recorded_graphs(seed: str, count: int, renumber: bool, data: st.DataObject) -> None:
    doc = json.loads(TEXTS[seed])
    for _ in range(count):
        _mutate(doc, data)
    text = dumps(_numbered(doc, renumber))   # renumbered: get past the id check more often
    note(f"input: {text[:3000]!r}")
    check_outcome(text, SPEC)


@settings(FUZZ, max_examples=1000)
@given(seed=st.sampled_from(SEEDS), count=st.integers(1, 3), data=st.data())
def test_mutated_recorded_graphs_dry_run(seed: str, count: int, data: st.DataObject) -> None:
    doc = json.loads(TEXTS[seed])
    for _ in range(count):
        _mutate(doc, data)
    text = dumps(_numbered(doc, True))
    note(f"input: {text[:3000]!r}")
    check_outcome(text, SPEC, dry=DRY)


# ---- text mutations -------------------------------------------------------------------------------

@settings(FUZZ, max_examples=1200)
@given(seed=st.sampled_from(SEEDS), data=st.data())
def test_mutated_text(seed: str, data: st.DataObject) -> None:
    raw = TEXTS[seed].encode()
    for _ in range(data.draw(st.integers(1, 3))):
        where = data.draw(st.integers(0, len(raw)))
        action = data.draw(st.sampled_from(["truncate", "insert", "overwrite", "repeat"]))
        if action == "truncate":
            raw = raw[:where]
        elif action == "insert":
            raw = raw[:where] + data.draw(st.binary(min_size=1, max_size=8)) + raw[where:]
        elif action == "overwrite":
            chunk = data.draw(st.binary(min_size=1, max_size=8))
            raw = raw[:where] + chunk + raw[where + len(chunk):]
        else:
            end = data.draw(st.integers(where, min(len(raw), where + 200)))
            raw = raw[:end] + raw[where:end] * data.draw(st.integers(1, 5)) + raw[end:]
    note(f"input: {raw[:3000]!r}")
    check_outcome(raw if data.draw(st.booleans()) else raw.decode("utf-8", errors="replace"), SPEC)


# ---- user-function sources -------------------------------------------------------------------------

python_ish = st.text(alphabet="x()[]+-*.:,= \n\t0123456789abcdefilmnoprstu_'\"#@\\{}", max_size=60)


def _deep(unit: str, depth: int) -> str:
    opener, _, closer = unit.partition("|")
    return "def f(x):\n    return " + opener * depth + "x" + closer * depth + "\n"


sources = st.one_of(
    st.builds(lambda body: f"def f(x):\n    return {body}\n", python_ish),
    python_ish,
    st.builds(_deep, st.sampled_from(["-|", "(|)", "[|]", "x[|]", "not |", "~|", "x+(|)", "|.a", "|+x", "|[0]"]),
              st.integers(1, 6000)),
)


@settings(FUZZ, max_examples=500)
@given(source=sources)
def test_apply_sources(source: str) -> None:
    doc = json.loads(TEXTS["grad_apply"])
    apply_node = next(n for n in doc["nodes"] if n["op"] == "apply")
    apply_node["target"] = source
    note(f"source: {source[:3000]!r}")
    check_outcome(dumps(doc), SPEC)


# ---- reproducers of crashes the fuzzers found --------------------------------------------------------

def _edit(seed: str, change: Callable[[dict[str, Any]], None]) -> str:
    doc = json.loads(TEXTS[seed])
    change(doc)
    return dumps(doc)


def _node(index: int, **fields: Any) -> Callable[[dict[str, Any]], None]:
    return lambda doc: doc["nodes"][index].update(fields)


REPRODUCERS: dict[str, tuple[str, Callable[[dict[str, Any]], None]]] = {
    # generate whose max_new_tokens is not an int, with a node at step 1: rules._check_binding compared
    # step < max_new_tokens before check_options looked at the option's type (TypeError; fixed)
    "generate_max_new_tokens_string": ("generate", lambda d: d.update(options=[["max_new_tokens", "5"]])),
    "generate_max_new_tokens_null": ("generate", lambda d: d.update(options=[["max_new_tokens", None]])),
    # torch.arange/linspace bounds beyond float range: math.isfinite(int) overflowed in rules._check_range
    # (OverflowError; fixed)
    "arange_huge_int": ("earlier_value", _node(1, op="call_function", target="torch.arange", args=[10**400],
                                               kwargs=[])),
    "linspace_huge_int": ("earlier_value", _node(1, op="call_function", target="torch.linspace",
                                                 args=[0, 2**1100, 5], kwargs=[])),
    # deeply nested user-function expressions: ast.parse raised RecursionError/MemoryError, not SyntaxError
    # (restricted.check_source; fixed)
    "apply_deep_unary": ("grad_apply", _node(13, target="def f(x):\n    return " + "-" * 19000 + "x\n")),
    "apply_deep_binary": ("grad_apply", _node(13, target="def f(x):\n    return x" + "+x" * 9000 + "\n")),
    "apply_deep_attribute": ("grad_apply", _node(13, target="def f(x):\n    return x" + ".a" * 9000 + "\n")),
    # near misses that never crashed: keep them that way
    "apply_null_byte": ("grad_apply", _node(13, target="def f(x):\n    return x\x00\n")),
    "apply_deep_parens": ("grad_apply", _node(13, target="def f(x):\n    return " + "(" * 5000 + "x" + ")" * 5000)),
    "size_beyond_int64": ("earlier_value", _node(2, args=[{"$ref": 1}, {"$size": [2**64]}])),
    "device_index_huge": ("earlier_value", _node(2, args=[{"$ref": 1}, {"$device": "cpu:99999999999999999999"}])),
}


def test_reproducer_nodes_are_where_the_reproducers_expect() -> None:
    assert json.loads(TEXTS["grad_apply"])["nodes"][13]["op"] == "apply"
    assert json.loads(TEXTS["earlier_value"])["nodes"][2]["op"] == "call_method"


@pytest.mark.parametrize("name", sorted(REPRODUCERS))
def test_reproducer(name: str) -> None:
    seed, change = REPRODUCERS[name]
    check_outcome(_edit(seed, change), SPEC)
