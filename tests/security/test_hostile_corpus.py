"""The hostile corpus: graphs an attacker could send, each refused by ``validate`` with its stable code.

Every case starts from a graph recorded with sandbox_client on a tiny random model (Llama or GPT-2,
traced or generated), then mutates its JSON: swaps a node's op or target, appends nodes, breaks
the document. Each case asserts ``ValidationError`` *and* the exact ``err.code``; a case that is
refused for the wrong reason is a rule that does not do its job.

    CASES = [Case("fn-os-system", "llama", lambda d: d.call("os.system", "id"), "target_not_allowed"), ...]

Values in appended nodes are written as Python values (``Ref``, tuples, ``torch.device``, inf) and
encoded with the format's own ``encode_value``; raw JSON is used only where the JSON itself is the attack.
"""
from __future__ import annotations

import base64
import json
import pickle
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import pytest
import torch
from conftest import build_tiny

import sandbox_client as sc
from sandbox_client.graph import Graph, Node, Ref, encode_value
from validator import Limits, ModelSpec, ValidationError, validate

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


@pytest.fixture(scope="module")
def bases() -> dict[str, Base]:
    return record_bases()


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


L = Limits
T = "target_not_allowed"
CASES: list[Case] = [
    # ---- the document: schema, version, types ----------------------------------------------------
    Case("doc-is-list", "llama", lambda d: "[]", "format"),
    Case("doc-is-string", "llama", lambda d: '"with lm.trace(): ..."', "format"),
    Case("doc-is-number", "llama", lambda d: "42", "format"),
    Case("doc-is-python-dict", "llama", lambda d: d.data, "format"),
    Case("doc-truncated", "llama", lambda d: d.text()[:-7], "format"),
    Case("doc-empty", "llama", lambda d: "", "format"),
    Case("doc-not-utf8", "llama", lambda d: d.text().encode("ascii").replace(b'"source":"', b'"source":"\xff', 1),
         "format"),
    Case("doc-utf16-with-bom", "llama", lambda d: b"\xff\xfe" + d.text().encode("utf-16-le"), "format"),
    Case("doc-utf16-no-bom", "llama", lambda d: d.text().encode("utf-16-le"), "format"),
    Case("doc-extra-top-field", "llama", lambda d: d.update(code="__import__('os')"), "format"),
    Case("doc-missing-options", "llama", lambda d: d.drop("options"), "format"),
    Case("doc-missing-nodes", "llama", lambda d: d.drop("nodes"), "format"),
    Case("doc-version-2", "llama", lambda d: d.update(version=2), "version"),
    Case("doc-version-string", "llama", lambda d: d.update(version="1"), "version"),
    Case("doc-version-true", "llama", lambda d: d.update(version=True), "version"),
    Case("doc-kind-train", "llama", lambda d: d.update(kind="train"), "format"),
    Case("doc-nodes-object", "llama", lambda d: d.update(nodes={"0": {}}), "format"),
    Case("node-unknown-op-exec", "llama", lambda d: d.set(1, op="exec"), "format"),
    Case("node-unknown-field", "llama", lambda d: d.set(1, code="import os"), "format"),
    Case("node-missing-field", "llama", lambda d: d.drop("source", 1), "format"),
    Case("node-ids-out-of-order", "llama", swap_ids, "format"),
    Case("node-id-string", "llama", lambda d: d.set(0, id="0"), "format"),
    Case("node-args-object", "llama", lambda d: d.set(1, args={"$ref": 0}), "format"),
    Case("node-kwargs-plain-object", "llama", lambda d: d.set(1, kwargs={"dim": -1}), "format"),
    Case("node-step-word", "llama", lambda d: d.set(1, step="every"), "format"),
    Case("node-invoke-string", "llama", lambda d: d.set(1, invoke="0"), "format"),
    Case("invoke-extra-field", "llama", two_invokes_with_extra, "format"),
    Case("getattr-computed-name", "llama", lambda d: d.set(9, target={"$ref": 8}), "format"),
    Case("value-unknown-tag-pickle", "llama", lambda d: d.args(1, {"$ref": 0}, {"$pickle": "gASVAAAAAAAAAAA="}),
         "format"),
    Case("value-unknown-tag-module", "llama", lambda d: d.args(1, {"$ref": 0}, {"$module": "os"}), "format"),
    Case("value-plain-object-dunder", "llama", lambda d: d.args(1, {"$ref": 0}, {"__class__": 1}), "format"),
    Case("value-two-key-tag", "llama", lambda d: d.args(1, {"$ref": 0, "$tuple": []}), "format"),
    Case("value-pickle-as-tensor", "llama", pickle_tensor, "format"),
    Case("value-unknown-dtype", "llama", lambda d: d.args(1, {"$ref": 0}, {"$dtype": "float128"}), "format"),
    Case("value-bad-float", "llama", lambda d: d.args(1, {"$ref": 0}, {"$float": "1e999"}), "format"),
    Case("value-bare-nan", "llama", lambda d: json_with(d, "@NAN@", "NaN"), "format"),
    Case("value-bare-infinity", "llama", lambda d: json_with(d, "@INF@", "-Infinity"), "format"),

    # ---- references, cycles -------------------------------------------------------------------------
    Case("ref-later-node", "llama", lambda d: d.args(1, {"$ref": 2}, 2), "bad_reference"),
    Case("ref-itself", "llama", lambda d: d.args(1, {"$ref": 1}, 2), "bad_reference"),
    Case("ref-dangling", "llama", lambda d: d.args(1, {"$ref": 999}, 2), "bad_reference"),
    Case("ref-negative", "llama", lambda d: d.args(1, {"$ref": -1}, 2), "format"),
    Case("ref-bool", "llama", lambda d: d.args(1, {"$ref": True}, 2), "format"),
    Case("ref-cycle-two-nodes", "llama", cycle, "bad_reference"),
    Case("ref-later-in-kwargs", "llama", lambda d: d.call("torch.softmax", H, dim=Ref(99)), "bad_reference"),
    Case("ref-later-in-slice", "llama", lambda d: d.args(1, {"$ref": 0}, {"$slice": [None, {"$ref": 5}, None]}),
         "bad_reference"),
    Case("after-later-node", "llama", lambda d: d.set(1, after=[5]), "bad_reference"),
    Case("after-negative", "llama", lambda d: d.set(1, after=[-1]), "bad_reference"),

    # ---- call targets: exact names only ------------------------------------------------------------
    *(Case(f"fn-{name}", "llama", lambda d, name=name, args=args: d.call(name, *args), T) for name, args in [
        ("os.system", ("id",)), ("subprocess.Popen", (["sh", "-c", "id"],)), ("sys.exit", (1,)),
        ("builtins.eval", ("1+1",)), ("builtins.exec", ("import os",)), ("builtins.open", ("/etc/passwd",)),
        ("builtins.__import__", ("os",)), ("builtins.getattr", (H, "stor" + "age")), ("builtins.type", (H,)),
        ("builtins.vars", (H,)), ("builtins.setattr", (H, "data", 0)), ("torch.load", ("/tmp/x.pt",)),
        ("torch.save", (H, "/tmp/x.pt")), ("torch.hub.load", ("a/b", "m")), ("torch.ops.aten.add", (H, H)),
        ("torch.ops.aten.empty.memory_format", ([10],)), ("torch.utils.cpp_extension.load_inline", ("m", "")),
        ("torch.classes.load_library", ("/tmp/x.so",)), ("torch.library.Library", ("aten", "IMPL")),
        ("torch.distributed.init_process_group", ("gloo",)), ("torch.empty", (10,)), ("torch.empty_like", (H,)),
        ("torch.from_file", ("/etc/passwd",)), ("torch.set_default_device", ("cuda",)),
        ("torch.manual_seed", (0,)), ("torch.set_grad_enabled", (True,)), ("torch.jit.load", ("/tmp/x",)),
        ("torch.compile", (H,)), ("torch.cuda.set_device", (1,)), ("operator.attrgetter", ("__class__",)),
        ("operator.methodcaller", ("storage",)), ("operator.setitem", (W, 0, 0.0)), ("functools.partial", (H,)),
        ("importlib.import_module", ("os",)), ("pickle.loads", (b"x".hex(),)), ("numpy.load", ("/tmp/x.npy",)),
        ("torch.Tensor.storage", (H,)), ("torch.nn.functional", (H,)),
        ("torch.nn.functional.softmax.__globals__", (H,)), ("torch.nn.functional.__builtins__", (H,)),
        ("torch.softmax ", (H, -1)), ("TORCH.softmax", (H, -1)), ("torch.nn.functional.softmax.x", (H,)),
    ]),
    Case("fn-huge-name", "llama", long_target, T),

    # ---- tensor methods and attributes --------------------------------------------------------------
    *(Case(f"method-{name}", "llama", lambda d, name=name, args=args: d.method(name, H, *args), T)
      for name, args in [
        ("storage", ()), ("untyped_storage", ()), ("data_ptr", ()), ("numpy", ()), ("tofile", ("/tmp/x",)),
        ("cuda", ()), ("cpu", ()), ("pin_memory", ()), ("share_memory_", ()), ("__reduce_ex__", (2,)),
        ("__setattr__", ("data", 0)), ("__class__", ()), ("register_hook", ()), ("set_", ()), ("resize_", (10**9,)),
        ("as_strided", ((10**6,), (0,))), ("type", ("torch.cuda.FloatTensor",)), ("apply_", ()),
        ("new_empty", ((10,),)), ("requires_grad_", ()), ("_version", ()),
    ]),
    *(Case(f"getattr-{name}", "llama", lambda d, name=name: d.attr(name), code) for name, code in [
        ("__class__", "dunder"), ("__subclasses__", "dunder"), ("__globals__", "dunder"), ("__builtins__", "dunder"),
        ("__code__", "dunder"), ("__dict__", "dunder"), ("__reduce__", "dunder"), ("_modules", "dunder"),
        ("_base", "dunder"), ("gi_frame", "attribute_not_allowed"), ("f_globals", "attribute_not_allowed"),
        ("weight", "attribute_not_allowed"), ("grad", "attribute_not_allowed"), ("data", "attribute_not_allowed"),
        ("device", "attribute_not_allowed"), ("", "attribute_not_allowed"),
    ]),
    Case("getattr-chain-class-subclasses", "llama",
         lambda d: d.chain(("getattr", "__class__", ()), ("getattr", "__subclasses__", ()), start=H), "dunder"),
    Case("getattr-chain-logits-class", "llama", lambda d: d.attr("__class__", LOGITS), "dunder"),
    Case("getattr-on-weight", "llama", lambda d: d.attr("__dict__", W), "dunder"),

    # ---- device moves ------------------------------------------------------------------------------
    Case("to-cuda-string", "llama", lambda d: d.method("to", H, "cuda:1"), "device_move"),
    Case("to-device-value", "llama", lambda d: d.method("to", H, torch.device("cuda:1")), "device_move"),
    Case("to-device-keyword", "llama", lambda d: d.method("to", H, device="cuda"), "device_move"),
    Case("to-other-tensor", "llama", lambda d: d.method("to", H, LOGITS), "device_move"),
    Case("to-non-blocking", "llama", lambda d: d.method("to", H, torch.float16, non_blocking=True), "device_move"),
    Case("type-as-cuda-type-name", "llama", lambda d: d.method("type_as", H, "torch.cuda.FloatTensor"),
         "device_move"),
    Case("zeros-on-cuda", "llama", lambda d: d.call("torch.zeros", 3, device="cuda"), "device_move"),
    Case("ones-pinned", "llama", lambda d: d.call("torch.ones", 3, pin_memory=True), "device_move"),
    Case("tensor-on-cuda", "llama", lambda d: d.call("torch.tensor", [1.0], device="cuda:1"), "device_move"),
    Case("zeros-like-on-cuda", "llama", lambda d: d.call("torch.zeros_like", H, device="cuda:1"), "device_move"),
    Case("softmax-device-keyword", "llama", lambda d: d.call("torch.softmax", H, -1, device="cuda"), "device_move"),

    # ---- sizes: factories, expand, repeat and friends ----------------------------------------------
    *(Case(f"size-{name}", "llama", lambda d, attack=attack: attack(d), "factory_size") for name, attack in [
        ("zeros-10e12", lambda d: d.call("torch.zeros", 10**12)),
        ("zeros-tuple-10e6-squared", lambda d: d.call("torch.zeros", (10**6, 10**6))),
        ("zeros-size-keyword", lambda d: d.call("torch.zeros", size=(10**7, 10**7))),
        ("zeros-node-reference", lambda d: d.call("torch.zeros", Ref(6))),
        ("zeros-reference-in-tuple", lambda d: d.call("torch.zeros", (2, Ref(6)))),
        ("zeros-size-literal-10e30", lambda d: d.call("torch.zeros", torch.Size([10**30]))),
        ("zeros-float-size", lambda d: d.call("torch.zeros", 1e6)),
        ("zeros-bool-size", lambda d: d.call("torch.zeros", True)),
        ("randn-negative", lambda d: d.call("torch.randn", -5)),
        ("ones-many-dims", lambda d: d.call("torch.ones", *([8] * 12))),
        ("full-10e10", lambda d: d.call("torch.full", (10**10,), 1.0)),
        ("randn-2e14-squared", lambda d: d.call("torch.randn", 2**14, 2**14)),
        ("rand-size-keyword", lambda d: d.call("torch.rand", size=[2**30])),
        ("randint-huge", lambda d: d.call("torch.randint", 0, 10, (10**12,))),
        ("randint-size-keyword", lambda d: d.call("torch.randint", 10, size=(10**12,))),
        ("eye-square", lambda d: d.call("torch.eye", 10**5)),
        ("eye-m-keyword", lambda d: d.call("torch.eye", 10, m=10**9)),
        ("arange-inf", lambda d: d.call("torch.arange", float("inf"))),
        ("arange-nan", lambda d: d.call("torch.arange", 0, float("nan"))),
        ("arange-10e12", lambda d: d.call("torch.arange", 0, 10**12)),
        ("arange-tiny-step", lambda d: d.call("torch.arange", 0, 1, 1e-12)),
        ("arange-step-keyword", lambda d: d.call("torch.arange", 0, 10, step=1e-12)),
        ("arange-end-keyword", lambda d: d.call("torch.arange", 0, end=10**12)),
        ("arange-10e400", lambda d: d.call("torch.arange", 10**400)),
        ("linspace-2e1100-bounds", lambda d: d.call("torch.linspace", 0, 2**1100, 5)),
        ("arange-zero-step", lambda d: d.call("torch.arange", 0, 1, 0)),
        ("arange-reference", lambda d: d.call("torch.arange", Ref(6))),
        ("linspace-10e12", lambda d: d.call("torch.linspace", 0, 1, 10**12)),
        ("linspace-steps-keyword", lambda d: d.call("torch.linspace", 0, 1, steps=10**12)),
        ("linspace-reference-steps", lambda d: d.call("torch.linspace", 0, 1, Ref(6))),
        ("expand-huge", lambda d: d.method("expand", H, 10**6, 10**6, 10**6)),
        ("expand-size-keyword", lambda d: d.method("expand", H, size=(10**6, 10**6, 10**6))),
        ("expand-reference", lambda d: d.method("expand", H, Ref(6), -1, -1)),
        ("repeat-blowup", lambda d: d.method("repeat", H, 1000, 1000, 1000)),
        ("repeat-tuple-blowup", lambda d: d.method("repeat", H, (10**5, 10**5))),
        ("repeat-keyword-blowup", lambda d: d.method("repeat", H, repeats=(10**5, 10**5, 1))),
        ("broadcast-to-huge", lambda d: d.call("torch.broadcast_to", H, (10**6, 10**6, 6, 32))),
        ("pad-huge", lambda d: d.call("torch.nn.functional.pad", H, (0, 10**9))),
        ("pad-reference", lambda d: d.call("torch.nn.functional.pad", H, (0, Ref(6)))),
        ("one-hot-inferred-classes", lambda d: d.call("torch.nn.functional.one_hot", Ref(6))),
        ("one-hot-huge", lambda d: d.call("torch.nn.functional.one_hot", Ref(6), num_classes=10**9)),
        ("multinomial-huge", lambda d: d.call("torch.multinomial", LOGITS, 10**9, True)),
    ]),

    # ---- writes to weights and buffers -------------------------------------------------------------
    *(Case(f"weight-{name}", base, lambda d, steps=steps, start=start: d.chain(*steps, start=start),
           "write_to_weight") for name, base, start, steps in [
        ("add_", "llama", W, [("call_method", "add_", (1.0,))]),
        ("setitem", "llama", W, [("setitem", None, (0, 0.0))]),
        ("zero_", "llama", W, [("call_method", "zero_", ())]),
        ("copy_", "llama", W, [("call_method", "copy_", (Ref(4),))]),
        ("view-setitem", "llama", W, [("call_method", "view", (-1,)), ("setitem", None, (0, 1.0))]),
        ("t-add_", "llama", W, [("call_method", "t", ()), ("call_method", "add_", (1.0,))]),
        ("getitem-zero_", "llama", W, [("getitem", None, (0,)), ("call_method", "zero_", ())]),
        ("detach-copy_", "llama", W, [("call_method", "detach", ()), ("call_method", "copy_", (Ref(4),))]),
        ("T-fill_", "llama", W, [("getattr", "T", ()), ("call_method", "fill_", (0.0,))]),
        ("view-transpose-narrow-setitem", "llama", W, [
            ("call_method", "view", (4, -1)), ("call_method", "transpose", (0, 1)),
            ("call_method", "narrow", (0, 0, 2)), ("setitem", None, (..., 0.0))]),
        ("split-getitem-add_", "llama", W, [("call_method", "split", (2,)), ("getitem", None, (0,)),
                                            ("call_method", "add_", (1.0,))]),
        ("expand-as-mul_", "llama", W, [("call_method", "expand_as", (Ref(4),)), ("call_method", "mul_", (0.0,))]),
        ("same-dtype-to-mul_", "llama", W, [("call_method", "to", (torch.float32,)), ("call_method", "mul_", (0.0,))]),
        ("float-zero_", "llama", W, [("call_method", "float", ()), ("call_method", "zero_", ())]),
        ("type-as-self-add_", "llama", W, [("call_method", "type_as", (Ref(3),)), ("call_method", "add_", (1.0,))]),
        ("torch-t-add_", "llama", W, [("call_function", "torch.t", ()), ("call_method", "add_", (1.0,))]),
        ("operator-getitem-zero_", "llama", W, [("call_function", "operator.getitem", (0,)),
                                                ("call_method", "zero_", ())]),
        ("dropout-eval-zero_", "llama", W, [("call_function", "torch.nn.functional.dropout", (0.5, False)),
                                            ("call_method", "zero_", ())]),
        ("gpt2-wte-setitem", "gpt2", Ref(4), [("setitem", None, (0, 0.0))]),
        ("gpt2-wte-unbind-getitem-neg_", "gpt2", Ref(4), [("call_method", "unbind", ()), ("getitem", None, (0,)),
                                                          ("call_method", "neg_", ())]),
    ]),
    Case("weight-einsum-transpose-zero_", "llama",
         lambda d: d.chain(("call_method", "zero_", ()), start=d.add("call_function", "torch.einsum", "ij->ji", W)),
         "write_to_weight"),
    Case("weight-einsum-operand-list-zero_", "llama",
         lambda d: d.chain(("call_method", "zero_", ()), start=d.add("call_function", "torch.einsum", "ij->ji", [W])),
         "write_to_weight"),
    Case("weight-buffer-inv-freq-mul_", "llama",
         lambda d: d.chain(("call_method", "mul_", (0.0,)), start=d.add("param", "model.rotary_emb.inv_freq")),
         "write_to_weight"),
    Case("write-out-keyword-into-weight", "llama", lambda d: d.call("torch.add", H, 1.0, out=W),
         "argument_not_allowed"),
    Case("write-relu-inplace-weight", "llama", lambda d: d.call("torch.nn.functional.relu", W, inplace=True),
         "argument_not_allowed"),
    Case("write-relu-inplace-positional", "llama", lambda d: d.call("torch.nn.functional.relu", W, True),
         "argument_not_allowed"),
    Case("write-dropout-inplace-positional", "llama",
         lambda d: d.call("torch.nn.functional.dropout", W, 0.5, False, True), "argument_not_allowed"),
    Case("write-max-out-pair", "llama", lambda d: d.call("torch.max", H, -1, out=(W, W)), "argument_not_allowed"),
    Case("write-tensordot-out-positional", "llama", lambda d: d.call("torch.tensordot", H, H, 1, W),
         "argument_not_allowed"),
    Case("backward-create-graph-positional", "llama", lambda d: d.method("backward", Ref(6), None, True, True),
         "argument_not_allowed"),
    Case("backward-inputs-keyword", "llama", lambda d: d.method("backward", Ref(6), inputs=[W]),
         "argument_not_allowed"),
    Case("grad-of-weight", "llama", lambda d: d.add("grad", None, W) and d, "grad_target"),
    Case("set-grad-of-weight", "llama", lambda d: d.add("set_grad", None, W, W) and d, "grad_target"),

    # ---- module and parameter paths ------------------------------------------------------------------
    Case("path-layer-99", "llama", lambda d: d.set(0, target="model.layers.99"), "module_path"),
    Case("path-gpt2-name-on-llama", "llama", lambda d: d.set(0, target="transformer.h.0"), "module_path"),
    Case("path-dunder", "llama", lambda d: d.set(0, target="model.__class__"), "module_path"),
    Case("path-trailing-dot", "llama", lambda d: d.set(0, target="model.layers.0."), "module_path"),
    Case("path-call-module-unknown", "llama", lambda d: d.add("call_module", "model.layers.0.shell", H) and d,
         "module_path"),
    Case("path-set-output-unknown", "llama", lambda d: d.add("set_output", "lm_head2", H) and d, "module_path"),
    Case("path-skip-unknown", "llama", lambda d: d.add("skip", "model.layers.7", H) and d, "module_path"),
    Case("param-unknown-name", "llama", lambda d: d.set(3, target="model.layers.0.mlp.up_proj.weights"),
         "param_path"),
    Case("param-is-a-module", "llama", lambda d: d.set(3, target="model.layers.0.mlp"), "param_path"),
    Case("param-dunder-dict", "llama", lambda d: d.set(3, target="model.layers.0.mlp.up_proj.weight.__dict__"),
         "param_path"),
    Case("param-empty-name", "llama", lambda d: d.set(3, target=""), "param_path"),

    # ---- bindings: invokes and steps ----------------------------------------------------------------
    Case("invoke-out-of-range", "llama", lambda d: d.set(1, invoke=5), "bad_invoke"),
    Case("invoke-negative", "llama", lambda d: d.set(1, invoke=-1), "bad_invoke"),
    Case("step-in-a-trace", "llama", lambda d: d.set(1, step=1), "step_range"),
    Case("step-negative", "generate", lambda d: d.set(0, step=-1), "step_range"),
    Case("step-beyond-max-new-tokens", "generate", lambda d: d.set(0, step=3), "step_range"),
    Case("step-10e9", "generate", lambda d: d.set(0, step=10**9), "step_range"),

    # ---- time order and skips ------------------------------------------------------------------------
    Case("order-write-needs-later-layer", "llama", impossible_order, "order"),
    Case("order-write-needs-later-step", "generate", write_a_step_ahead, "order"),
    Case("order-forward-write-needs-gradient", "llama", grad_into_forward, "order"),
    Case("skip-nested-in-skip", "llama", nested_skip, "skip_nested"),

    # ---- generation options ---------------------------------------------------------------------------
    Case("gen-max-new-tokens-10e6", "generate", lambda d: d.options(max_new_tokens=10**6), "max_new_tokens"),
    Case("gen-max-new-tokens-zero", "generate", lambda d: d.options(max_new_tokens=0), "max_new_tokens"),
    Case("gen-max-new-tokens-inf", "generate", lambda d: d.options(max_new_tokens=float("inf")),
         "option_not_allowed"),
    Case("gen-max-new-tokens-string", "generate", lambda d: d.options(max_new_tokens="3"), "option_not_allowed"),
    Case("gen-max-new-tokens-none", "generate", lambda d: d.options(max_new_tokens=None), "option_not_allowed"),
    Case("gen-max-new-tokens-bool", "generate", lambda d: d.options(max_new_tokens=True), "option_not_allowed"),
    Case("gen-temperature-nan", "generate", lambda d: d.options(max_new_tokens=3, temperature=float("nan")),
         "option_not_allowed"),
    Case("gen-top-p-inf", "generate", lambda d: d.options(max_new_tokens=3, top_p=float("inf")),
         "option_not_allowed"),
    Case("gen-unknown-option-streamer", "generate", lambda d: d.options(max_new_tokens=3, streamer="x"),
         "option_not_allowed"),
    Case("gen-unknown-option-num-beams", "generate", lambda d: d.options(max_new_tokens=3, num_beams=64),
         "option_not_allowed"),
    Case("gen-do-sample-string", "generate", lambda d: d.options(max_new_tokens=3, do_sample="yes"),
         "option_not_allowed"),
    Case("trace-with-options", "llama", lambda d: d.options(max_new_tokens=3), "option_not_allowed"),

    # ---- inputs ------------------------------------------------------------------------------------------
    Case("input-none", "llama", no_input, "input_invalid"),
    Case("input-token-equals-vocab", "llama", lambda d: d.input([[1, VOCAB]]), "input_invalid"),
    Case("input-token-negative", "llama", lambda d: d.input(torch.tensor([[1, -1]])), "input_invalid"),
    Case("input-too-many-tokens", "llama", lambda d: d.input([1] * 8193), "input_invalid"),
    Case("input-long-prompt", "llama", lambda d: d.input("a" * 9000), "input_invalid"),
    Case("input-float-tensor", "llama", lambda d: d.input(torch.ones(1, 4)), "input_invalid"),
    Case("input-3d-tensor", "llama", lambda d: d.input(torch.ones(1, 2, 3, dtype=torch.long)), "input_invalid"),
    Case("input-bool-tokens", "llama", lambda d: d.input([True, False]), "input_invalid"),
    Case("input-empty-list", "llama", lambda d: d.input([]), "input_invalid"),
    Case("input-two-args", "llama", lambda d: d.input([1, 2], [3, 4]), "input_invalid"),
    Case("input-labels-keyword", "llama", lambda d: d.input([1, 2], labels=[1, 2]), "input_invalid"),
    Case("input-cache-keyword", "llama", lambda d: d.input([1, 2], past_key_values=[1]), "input_invalid"),
    Case("input-dict-extra-key", "llama", lambda d: d.input({"input_ids": [1, 2], "inputs_embeds": [0.0]}),
         "input_invalid"),
    Case("input-too-many-invokes", "llama", too_many_invokes, "input_invalid", L(max_invokes=2)),
    Case("input-65-invokes", "llama", lambda d: d.update(invokes=d.data["invokes"] * 65), "input_invalid"),
    Case("input-too-many-rows", "llama", lambda d: d.input([[1, 2]] * 3), "input_invalid", L(max_batch_rows=2)),

    # ---- limits: nesting, strings, lists, bytes, counts ------------------------------------------------------
    Case("depth-json-100k", "llama", lambda d: d.nest(100_000), "depth"),
    Case("depth-json-objects-100k", "llama", lambda d: d.nest(100_000, '{"$tuple":[', "]}"), "depth"),
    Case("depth-tuple-300", "llama", lambda d: d.nest(300, '{"$tuple":[', "]}"), "depth"),
    Case("depth-list-30", "llama", lambda d: d.call("torch.tensor", nested(30)), "depth"),
    Case("depth-kwargs-dict-30", "llama", lambda d: d.call("torch.softmax", H, dim=nested(30)), "depth"),
    Case("depth-invoke-input-30", "llama", lambda d: d.input(nested(30, 1)), "depth"),
    Case("string-30k-arg", "llama", lambda d: d.call("torch.einsum", "i" * 30_000, H), "string_length"),
    Case("string-30k-kwarg", "llama", lambda d: d.call("torch.einsum", H, equation="i" * 30_000), "string_length"),
    Case("string-30k-dict-key", "llama", lambda d: d.call("torch.softmax", H, {"k" * 30_000: 1}), "string_length"),
    Case("string-30k-prompt", "llama", lambda d: d.input("a" * 30_000), "string_length"),
    Case("string-source-3000", "llama", lambda d: d.set(1, source="x" * 3000), "string_length"),
    Case("list-100001-items", "llama", lambda d: d.call("torch.tensor", [0] * 100_001), "list_length"),
    Case("list-small-limit", "llama", lambda d: d.call("torch.tensor", [0] * 11), "list_length",
         L(max_list_length=10)),
    Case("literal-tensor-over-limit", "llama", lambda d: d.call("operator.add", H, torch.ones(32)),
         "literal_bytes", L(max_literal_tensor_bytes=64)),
    Case("literal-tensors-add-up", "llama",
         lambda d: d.call("operator.add", H, torch.ones(10)).call("operator.add", H, torch.ones(10)),
         "literal_bytes", L(max_literal_tensor_bytes=100)),
    Case("literal-input-tensor-over-limit", "llama", lambda d: d.input(torch.ones(1, 100, dtype=torch.long)),
         "literal_bytes", L(max_literal_tensor_bytes=64)),
    Case("saves-over-limit", "llama", lambda d: d, "too_many_saves", L(max_saves=2)),
    Case("request-over-limit", "llama", lambda d: d, "request_too_large", L(max_request_bytes=1000)),
    Case("nodes-10001", "llama", many_nodes(10_001), "too_many_nodes"),
    Case("nodes-small-limit", "llama", lambda d: d, "too_many_nodes", L(max_nodes=5)),
    Case("nodes-graph-object-10001", "llama", many_node_graph(10_001), "too_many_nodes"),
    Case("nodes-spaced-key-10001", "llama", many_nodes(10_001, '"op" :'), "too_many_nodes"),
    Case("nodes-escaped-key-10001", "llama", many_nodes(10_001, '"\\u006fp":'), "too_many_nodes"),

    # ---- big requests: must still be refused fast ---------------------------------------------------------
    Case("big-1e6-nodes", "llama", many_nodes(10**6), "request_too_large", big=True),
    Case("big-1e6-nodes-large-request-limit", "llama", many_nodes(10**6), "too_many_nodes",
         L(max_request_bytes=2**30), big=True),
    Case("big-850k-nodes-spaced-key", "llama", many_nodes(850_000, '"op" :'), "too_many_nodes", big=True),
    Case("big-800k-nodes-escaped-key", "llama", many_nodes(800_000, '"\\u006F\\u0070"\t:'), "too_many_nodes",
         big=True),
    Case("big-1e6-node-graph-object", "llama", many_node_graph(10**6), "too_many_nodes", big=True),
    Case("big-string-50mb", "llama", lambda d: d.call("torch.einsum", "i" * 50 * 2**20, H), "string_length",
         big=True),
]

BY_ID = {case.id: case for case in CASES}
assert len(BY_ID) == len(CASES), "case ids must be unique"


def request_of(case: Case, bases: dict[str, Base]) -> tuple[Any, ModelSpec]:
    base = bases[case.base]
    built = case.attack(Doc(base.text))
    return (built.text() if isinstance(built, Doc) else built), base.spec


def refusal(request: Any, spec: ModelSpec, limits: Limits | None) -> tuple[ValidationError, float]:
    start = time.perf_counter()
    with pytest.raises(ValidationError) as caught:
        validate(request, spec, limits)
    return caught.value, time.perf_counter() - start


@pytest.mark.parametrize("case", CASES, ids=[c.id for c in CASES])
def test_hostile_graph_is_refused_with_its_code(case: Case, bases: dict[str, Base]) -> None:
    request, spec = request_of(case, bases)
    err, seconds = refusal(request, spec, case.limits)
    assert err.code == case.code, f"{case.id}: refused as {err.code!r} ({err.message}), expected {case.code!r}"
    assert err.message and err.to_dict()["code"] == case.code
    if case.big:
        assert seconds < 2.0, f"{case.id}: took {seconds:.2f} s to refuse"


def test_every_case_answers_within_a_second(bases: dict[str, Base]) -> None:
    slow = {}
    for case in CASES:
        if not case.big:
            request, spec = request_of(case, bases)
            _, seconds = refusal(request, spec, case.limits)
            if seconds >= 1.0:
                slow[case.id] = round(seconds, 2)
    assert not slow, f"cases slower than 1 s: {slow}"


def test_corpus_covers_the_issue_list() -> None:
    assert len(CASES) >= 70
    codes = {case.code for case in CASES}
    assert codes >= {
        "format", "version", "bad_reference", "target_not_allowed", "dunder", "attribute_not_allowed", "device_move",
        "factory_size", "write_to_weight", "argument_not_allowed", "module_path", "param_path", "bad_invoke",
        "step_range", "order", "skip_nested", "max_new_tokens", "option_not_allowed", "input_invalid", "depth",
        "string_length", "list_length", "literal_bytes", "too_many_saves", "request_too_large", "too_many_nodes",
        "grad_target",
    }


def test_node_errors_point_at_the_users_line(bases: dict[str, Base]) -> None:
    """Rule failures carry the node id and the source line of the node at fault."""
    for case_id in ("fn-os.system", "getattr-__class__", "weight-t-add_", "size-zeros-10e12", "to-cuda-string"):
        request, spec = request_of(BY_ID[case_id], bases)
        err, _ = refusal(request, spec, None)
        assert err.node is not None and err.source == SOURCE, case_id
        assert SOURCE in str(err)


def test_recursion_never_escapes_as_recursion_error(bases: dict[str, Base]) -> None:
    for depth in (500, 990, 5_000, 100_000):
        text = Doc(bases["llama"].text).nest(depth)
        with pytest.raises(ValidationError) as caught:
            validate(text, bases["llama"].spec)
        assert caught.value.code == "depth"


def test_the_bases_themselves_pass(bases: dict[str, Base]) -> None:
    """The corpus is only meaningful if the unmutated recordings are accepted."""
    for name, base in bases.items():
        checked = validate(base.text, base.spec)
        assert checked.graph.to_json() == base.text, name
