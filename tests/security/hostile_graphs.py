"""Building blocks of the hostile corpus: graphs recorded on tiny models, and helpers that mutate
their JSON the way an attacker would (see test_hostile_corpus.py for how they are used).

    d = Doc(record_bases()["llama"].text); d.call("os.system", "id"); d.text()
"""
from __future__ import annotations

import base64
import json
import pickle
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
from conftest import build_tiny

import sandbox_client as sc
from sandbox_client.graph import Graph, Node, Ref, encode_value
from validator import Limits, ModelSpec

IDS = torch.tensor([[3, 14, 15, 92, 65, 35]])
VOCAB = 50257
SOURCE = "attack.py:1: hostile"
H, W, LOGITS = Ref(0), Ref(3), Ref(9)       # in the "llama" base: layer 0's output, a weight, the logits


# ---- the recorded bases ---------------------------------------------------------------------------

@dataclass(frozen=True)
class Base:
    text: str
    spec: ModelSpec


def record_bases() -> dict[str, Base]:
    llama = build_tiny("llama", layers=2, width=32)
    gpt2 = build_tiny("gpt2", layers=2, width=32)
    lm, lm2 = sc.LanguageModel(llama), sc.LanguageModel(gpt2)
    llama_spec, gpt2_spec = ModelSpec.from_module(llama, name="tiny-llama"), ModelSpec.from_module(gpt2, "tiny-gpt2")
    bases: dict[str, Base] = {}

    with lm.trace(IDS) as tracer:
        h = lm.model.layers[0].output                       # 0
        (h * 2).save()                                      # 1, 2
        w = lm.model.layers[0].mlp.up_proj.weight           # 3
        (w.clone() * 0.5).sum().save()                      # 4, 5, 6, 7
        lm.output.logits.save()                             # 8, 9, 10
    bases["llama"] = Base(tracer.graph.to_json(), llama_spec)
    nodes = tracer.graph.nodes
    assert (nodes[0].op, nodes[3].op, nodes[9].target) == ("output", "param", "logits")

    with lm.generate(IDS, max_new_tokens=3) as tracer:
        with tracer.step(1):
            lm.model.layers[0].output[:] = lm.model.layers[0].output * 1.5
        with tracer.all_steps():
            lm.lm_head.output[:, -1].argmax(-1).save()
        tracer.result.save()
    bases["generate"] = Base(tracer.graph.to_json(), llama_spec)
    assert tracer.graph.nodes[0].op == "output"

    with lm2.trace(IDS) as tracer:
        h = lm2.transformer.h[0].output[0]                  # 0, 1
        (h * 2).save()                                      # 2, 3
        lm2.transformer.wte.weight.save()                   # 4, 5
        lm2.output.logits.save()                            # 6, 7, 8
    bases["gpt2"] = Base(tracer.graph.to_json(), gpt2_spec)
    assert tracer.graph.nodes[4].op == "param"
    return bases



class Doc:
    """A base graph's JSON document, with helpers that append nodes the way the tracer would."""

    def __init__(self, text: str) -> None:
        self.data: dict[str, Any] = json.loads(text)

    @property
    def nodes(self) -> list[dict[str, Any]]:
        return self.data["nodes"]

    def add(self, op: str, target: str | None, *args: Any, **kwargs: Any) -> Ref:
        node = Node(len(self.nodes), op, target, args, kwargs, invoke=0, source=SOURCE)
        self.nodes.append(node.to_dict())
        return Ref(node.id)

    def call(self, target: str, *args: Any, **kwargs: Any) -> Doc:
        self.add("save", None, self.add("call_function", target, *args, **kwargs))
        return self

    def method(self, name: str, *args: Any, **kwargs: Any) -> Doc:
        self.add("save", None, self.add("call_method", name, *args, **kwargs))
        return self

    def attr(self, name: str, obj: Ref = H) -> Doc:
        self.add("save", None, self.add("getattr", name, obj))
        return self

    def chain(self, *steps: tuple[str, str, tuple[Any, ...]], start: Ref = W) -> Doc:
        """Apply (op, target, extra args) in turn, each on the previous value: param -> view -> write."""
        value = start
        for op, target, extra in steps:
            value = self.add(op, target, value, *extra)
        return self

    def set(self, index: int, **fields: Any) -> Doc:
        self.nodes[index].update(fields)
        return self

    def update(self, **fields: Any) -> Doc:
        self.data.update(fields)
        return self

    def args(self, index: int, *raw_json: Any) -> Doc:
        """Set a node's args to raw JSON (no encoding): for attacks on the format itself."""
        self.nodes[index]["args"] = list(raw_json)
        return self

    def input(self, *args: Any, **kwargs: Any) -> Doc:
        self.data["invokes"] = [{"args": [encode_value(a) for a in args], "kwargs": encode_value(kwargs)["$dict"]}]
        return self

    def options(self, **options: Any) -> Doc:
        self.data["options"] = encode_value(options)["$dict"]
        return self

    def drop(self, key: str, index: int | None = None) -> Doc:
        (self.data if index is None else self.nodes[index]).pop(key)
        return self

    def text(self) -> str:
        return json.dumps(self.data, separators=(",", ":"))

    def nest(self, depth: int, opening: str = "[", closing: str = "]") -> str:
        """The text with node 1's literal argument (h * 2: the 2) replaced by ``depth`` levels of nesting."""
        text = self.text()
        assert text.count('"args":[{"$ref":0},2]') == 1
        nest = opening * depth + "0" + closing * depth
        return text.replace('"args":[{"$ref":0},2]', '"args":[{"$ref":0},' + nest + "]")


Attack = Callable[[Doc], Any]   # returns the Doc, or raw text/bytes/objects to send instead


@dataclass(frozen=True)
class Case:
    id: str
    base: str
    attack: Attack
    code: str
    limits: Limits | None = None
    big: bool = False          # builds a huge request: timed separately (the rest answer in < 1 s)


def nested(depth: int, leaf: Any = 0) -> Any:
    value = leaf
    for _ in range(depth):
        value = [value]
    return value


def tensor_b64(tensor: torch.Tensor) -> str:
    return encode_value(tensor)["$tensor"]


def node_lines(count: int, key: str = '"op":') -> str:
    node = ('{"id":%d,' + key + '"stop","target":null,"args":[],"kwargs":[],"invoke":null,"step":0,"after":[],'
            '"source":""}')
    return ",".join(node % i for i in range(count))


def many_nodes(count: int, key: str = '"op":') -> Callable[[Doc], str]:
    def build(d: Doc) -> str:
        head = json.dumps({**d.data, "nodes": []})
        return head[: -len("[]}")] + "[" + node_lines(count, key) + "]}"
    return build


def many_node_graph(count: int) -> Callable[[Doc], Graph]:
    def build(d: Doc) -> Graph:
        graph = Graph.from_json(d.text())
        graph.nodes = [Node(0, "stop")] * count    # one node object, many times: only the count matters here
        return graph
    return build


def two_invokes_with_extra(d: Doc) -> Doc:
    d.data["invokes"].append({"args": [{"$tensor": tensor_b64(IDS)}], "kwargs": [], "shell": "rm -rf /"})
    return d


def swap_ids(d: Doc) -> Doc:
    d.nodes[1]["id"], d.nodes[2]["id"] = 2, 1
    return d


def cycle(d: Doc) -> Doc:
    a = d.add("call_function", "operator.add", H, Ref(len(d.nodes) + 1))
    d.add("call_function", "operator.add", a, H)
    return d


def impossible_order(d: Doc) -> Doc:
    later = d.add("output", "model.layers.1")
    d.add("set_output", "model.layers.0", d.add("call_function", "operator.mul", later, 2))
    return d


def write_a_step_ahead(d: Doc) -> Doc:
    future = d.add("output", "model.layers.0")
    d.set(len(d.nodes) - 1, step=2)
    d.add("set_output", "model.layers.1", future)
    d.set(len(d.nodes) - 1, step=1)
    return d


def grad_into_forward(d: Doc) -> Doc:
    out = d.add("output", "model.layers.1")
    grad = d.add("grad", None, out)
    d.add("set_output", "model.layers.1", d.add("call_function", "operator.add", out, grad))
    return d


def nested_skip(d: Doc) -> Doc:
    inp = d.add("input", "model.layers.0")
    d.add("skip", "model.layers.0", inp)
    d.add("skip", "model.layers.0.mlp", d.add("input", "model.layers.0.mlp"))
    return d


def no_input(d: Doc) -> Doc:
    for node in d.nodes:
        node["invoke"] = None
    return d.update(invokes=[])


def too_many_invokes(d: Doc) -> Doc:
    d.data["invokes"] = d.data["invokes"] * 3
    return d


def json_with(d: Doc, placeholder: str, token: str) -> str:
    d.call("torch.mul", H, placeholder)
    return d.text().replace(json.dumps(placeholder), token)


def pickle_tensor(d: Doc) -> Doc:
    payload = base64.b64encode(pickle.dumps(torch.zeros(2))).decode("ascii")
    return d.args(1, {"$ref": 0}, {"$tensor": payload})


def long_target(d: Doc) -> Doc:
    return d.call("torch." + "a" * 1_000_000, H)
