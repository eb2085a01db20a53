"""validator.validate on the accepting side: real graphs recorded with sandbox_client pass, and run.

Every feature of the client (reads, in-place edits, replacement, logit lens, invokes with patching,
gradients, generation steps, skip, stop, factories, common tensor ops, dtype casts, parameters,
user functions) is recorded on tiny GPT-2, Llama and Qwen2 models. Each graph's JSON must pass
``validate``, and the validated graph, run again, must give exactly the values the direct trace saved
(the direct trace is the reference: same model, same graph, deterministic CPU kernels).
"""
from __future__ import annotations

from collections.abc import Callable
from typing import Any

import pytest
import torch
from conftest import build_tiny

import sandbox_client as sc
from sandbox_client.graph import OPS, Graph
from validator import Limits, ModelSpec, ValidatedGraph, ValidationError, validate

ARCHS = ("gpt2", "llama", "qwen2")
IDS = torch.tensor([[3, 14, 15, 92, 65, 35]])
CLEAN, CORRUPT = "The Eiffel Tower is in the city of", "The Colosseum is in the city of"


class Setup:
    def __init__(self, arch: str, tokenizer: Any) -> None:
        self.arch = arch
        self.hf = build_tiny(arch, layers=2, width=32)
        self.lm = sc.LanguageModel(self.hf, tokenizer=tokenizer)
        self.spec = ModelSpec.from_module(self.hf, name=f"tiny-{arch}")

    def blocks(self) -> Any:
        return self.lm.transformer.h if self.arch == "gpt2" else self.lm.model.layers

    def norm(self) -> Any:
        return self.lm.transformer.ln_f if self.arch == "gpt2" else self.lm.model.norm


@pytest.fixture(scope="module", params=ARCHS)
def setup(request: pytest.FixtureRequest, gpt2_tokenizer: Any) -> Setup:
    return Setup(request.param, gpt2_tokenizer)


def scale_rows(h, opts):       # an sc.apply user function
    out = []
    for i in range(2):
        out.append(h[:, i] * opts["scale"])
    return torch.stack(out)


# ---- the features: each records one trace or generation and returns its tracer ---------------------

def reads(s: Setup) -> sc.Tracer:
    with s.lm.trace(IDS) as tracer:
        s.blocks()[0].output.save()
        s.blocks()[1].input.save()
        s.blocks()[1].inputs.save()
        s.lm.output.logits.save()
    return tracer


def inplace_edits(s: Setup) -> sc.Tracer:
    with s.lm.trace(IDS) as tracer:
        s.blocks()[0].output[:, -1, :] = 0
        s.blocks()[1].mlp.output.mul_(0.5)
        x = s.blocks()[1].input
        x.add_(torch.ones(32))
        s.lm.output.logits.save()
    return tracer


def replacement(s: Setup) -> sc.Tracer:
    with s.lm.trace(IDS) as tracer:
        mlp = s.blocks()[1].mlp
        mlp.output = mlp.output * 2
        s.blocks()[0].input = s.blocks()[0].input + 0.25
        s.lm.output.logits.save()
    return tracer


def logit_lens(s: Setup) -> sc.Tracer:
    with s.lm.trace(IDS) as tracer:
        for block in s.blocks():
            probs = s.lm.lm_head(s.norm()(block.output)).softmax(-1)
            probs[:, -1].topk(3).indices.save()
    return tracer


def patching(s: Setup) -> sc.Tracer:
    with s.lm.trace() as tracer:
        with tracer.invoke(CLEAN):
            clean = s.blocks()[0].output[:, -1].save()
        with tracer.invoke([CORRUPT, CORRUPT + " Rome"]):
            s.blocks()[0].output[:, -1] = clean
            s.lm.output.logits[:, -1].save()
    return tracer


def gradients(s: Setup) -> sc.Tracer:
    with s.lm.trace(IDS) as tracer:
        s.blocks()[1].mlp.output.grad = s.blocks()[1].mlp.output.grad * 0.5
        s.blocks()[0].mlp.output.grad.save()
        s.lm.output.logits[0, -1, 7].backward()
    return tracer


def generation(s: Setup) -> sc.Tracer:
    with s.lm.generate(IDS, max_new_tokens=3) as tracer:
        with tracer.all_steps():
            s.lm.lm_head.output[:, -1].argmax(-1).save()
        with tracer.step(1):
            s.blocks()[0].mlp.output[:] = s.blocks()[0].mlp.output * 1.5
        with tracer.step(2):
            s.blocks()[1].output.save()
        tracer.result.save()
    return tracer


def skip_and_stop(s: Setup) -> sc.Tracer:
    with s.lm.trace(IDS) as tracer:
        s.blocks()[0].mlp.skip(s.blocks()[0].mlp.input)
        s.blocks()[1].output.save()
        tracer.stop()
    return tracer


def factories(s: Setup) -> sc.Tracer:
    with s.lm.trace(IDS) as tracer:
        h = s.blocks()[0].output
        torch.full((2, 3), h[0, 0, 0]).save()                 # a factory node: literal size, traced fill
        (torch.zeros_like(h) + torch.ones(32) * 0.1).save()   # eager factories travel as literals
        (h[0] @ torch.eye(32)[:, :4] + torch.arange(4.0) + torch.linspace(0, 1, 4)).save()
    return tracer


def tensor_ops(s: Setup) -> sc.Tracer:
    with s.lm.trace(IDS) as tracer:
        h = s.blocks()[1].output
        logits = s.lm.output.logits
        logits.softmax(-1).topk(5).values.save()
        torch.nn.functional.log_softmax(logits[0, -1], dim=-1).max().save()
        torch.einsum("bsd,bsd->bs", h, h).save()
        torch.cat([h[:, :1], h[:, -1:]], dim=1).save()
        torch.nn.functional.pairwise_distance(h[:, 0], h[:, 1]).save()     # recorded as torch.pairwise_distance
        (h.norm(dim=-1) / h.shape[-1]).save()
        torch.where(h > 0, h, float("nan")).nan_to_num(0.0).sum().save()
    return tracer


def casts(s: Setup) -> sc.Tracer:
    with s.lm.trace(IDS) as tracer:
        h = s.blocks()[0].output
        logits = s.lm.output.logits
        h.to(torch.float16).save()
        h.to(dtype=torch.bfloat16).float().save()
        h.double().sum(-1).save()
        h.argmax(-1).long().save()
        h.type_as(logits).save()
    return tracer


def parameters(s: Setup) -> sc.Tracer:
    with s.lm.trace(IDS) as tracer:
        w = s.lm.lm_head.weight
        w[:3].save()
        copy = w.clone()
        copy[0] = 0
        copy.add_(1.0)
        (copy * 0.5).sum().save()
        (s.blocks()[0].output @ w[:8].t()).save()
    return tracer


def user_function(s: Setup) -> sc.Tracer:
    with s.lm.trace(IDS) as tracer:
        sc.apply(scale_rows, s.blocks()[0].output, {"scale": 3.0}).save()
    return tracer


FEATURES: dict[str, Callable[[Setup], sc.Tracer]] = {f.__name__: f for f in (
    reads, inplace_edits, replacement, logit_lens, patching, gradients, generation, skip_and_stop, factories,
    tensor_ops, casts, parameters, user_function,
)}


def saved(tracer: sc.Tracer) -> dict[int, Any]:
    return {n.args[0].id: tracer.result_of(n.args[0].id) for n in tracer.graph.nodes if n.op == "save"}


def assert_same(a: Any, b: Any, where: str = "value") -> None:
    if isinstance(a, torch.Tensor):
        assert isinstance(b, torch.Tensor) and a.dtype == b.dtype and a.shape == b.shape, where
        assert torch.equal(a.nan_to_num(), b.nan_to_num()) and torch.equal(a.isnan(), b.isnan()), where
    elif isinstance(a, (list, tuple)):
        assert type(a) is type(b) and len(a) == len(b), where
        for i, (x, y) in enumerate(zip(a, b, strict=True)):
            assert_same(x, y, f"{where}[{i}]")
    elif isinstance(a, dict):
        assert a.keys() == b.keys(), where
        for k in a:
            assert_same(a[k], b[k], f"{where}[{k!r}]")
    elif hasattr(a, "to_tuple"):            # a Hugging Face ModelOutput
        assert_same(a.to_tuple(), b.to_tuple(), where)
    elif a is None or isinstance(a, (bool, int, float, str, torch.dtype)):
        assert a == b, where
    else:                                   # e.g. a DynamicCache inside .inputs: not part of the comparison
        assert type(a) is type(b), where


@pytest.mark.parametrize("feature", sorted(FEATURES))
def test_recorded_graph_passes_and_runs_the_same(setup: Setup, feature: str) -> None:
    tracer = FEATURES[feature](setup)
    text = tracer.graph.to_json()
    checked = validate(text, setup.spec)
    assert isinstance(checked, ValidatedGraph)
    assert checked.graph.to_json() == text
    assert checked.saves == sum(n.op == "save" for n in tracer.graph.nodes)
    assert checked.rows == (3 if feature == "patching" else 1)
    again = setup.lm.runner.run(checked.graph)
    reference = saved(tracer)
    assert again.keys() == reference.keys()
    for node_id, value in reference.items():
        assert_same(value, again[node_id], f"{feature}: node {node_id}")


def test_validate_accepts_a_graph_object_and_bytes(setup: Setup) -> None:
    graph = reads(setup).graph
    assert validate(graph, setup.spec).graph is graph
    assert validate(graph.to_json().encode("utf-8"), setup.spec).graph.to_json() == graph.to_json()


def test_validate_is_pure(setup: Setup) -> None:
    """Nothing runs: validating a graph does not call the model, and the same input gives the same answer."""
    text = parameters(setup).graph.to_json()
    calls = []
    handle = setup.hf.register_forward_pre_hook(lambda *a: calls.append(1))
    try:
        first, second = validate(text, setup.spec), validate(text, setup.spec)
    finally:
        handle.remove()
    assert calls == []
    assert first.graph.to_json() == second.graph.to_json() == text
    assert (first.saves, first.rows, first.literal_tensor_bytes) == (second.saves, second.rows,
                                                                     second.literal_tensor_bytes)


def test_literal_tensor_bytes_are_counted(setup: Setup) -> None:
    tracer = inplace_edits(setup)
    checked = validate(tracer.graph.to_json(), setup.spec)
    assert checked.literal_tensor_bytes == IDS.numel() * 8 + 32 * 4      # the input ids and torch.ones(32)


def test_limits_just_fit(setup: Setup) -> None:
    """Limits are bounds, not off by one: a graph exactly at each limit passes."""
    tracer = generation(setup)
    text, graph = tracer.graph.to_json(), tracer.graph
    saves = sum(n.op == "save" for n in graph.nodes)
    exact = Limits(max_nodes=len(graph.nodes), max_request_bytes=len(text), max_saves=saves, max_new_tokens=3,
                   max_invokes=1, max_batch_rows=1, max_tokens_per_row=IDS.shape[1],
                   max_literal_tensor_bytes=IDS.numel() * 8)
    validate(text, setup.spec, exact)
    for field, value in (("max_nodes", len(graph.nodes) - 1), ("max_request_bytes", len(text) - 1),
                         ("max_saves", saves - 1), ("max_new_tokens", 2), ("max_tokens_per_row", IDS.shape[1] - 1),
                         ("max_literal_tensor_bytes", IDS.numel() * 8 - 1)):
        with pytest.raises(ValidationError):
            validate(text, setup.spec, Limits(**{**exact.__dict__, field: value}))


def test_features_use_every_op(gpt2_tokenizer: Any) -> None:
    """Between them the features record every op of the format, so each op's acceptance is tested."""
    s = Setup("llama", gpt2_tokenizer)
    ops = {n.op for f in FEATURES.values() for n in f(s).graph.nodes}
    assert ops == set(OPS)


def test_graph_round_trip_of_validated_graph_is_exact(setup: Setup) -> None:
    text = tensor_ops(setup).graph.to_json()
    assert Graph.from_json(validate(text, setup.spec).graph.to_json()).to_json() == text


def test_method_call_with_traced_argument_expression(setup: Setup) -> None:
    with setup.lm.trace(IDS) as tracer:
        setup.blocks()[0].output.type_as(setup.lm.output.logits).save()
    validate(tracer.graph.to_json(), setup.spec)


def test_a_used_method_lookup_is_still_refused(setup: Setup) -> None:
    """The leftover lookup of a recorded call is harmless only while nothing uses it: a bound
    method handed to a user function could bypass the in-place checks."""
    import json

    with setup.lm.trace(IDS) as tracer:
        setup.blocks()[0].output.type_as(setup.lm.output.logits).save()
    doc = json.loads(tracer.graph.to_json())
    lookup = next(n for n in doc["nodes"] if n["op"] == "getattr" and n["target"] == "type_as")
    lookup["target"] = "add_"
    doc["nodes"].append({"id": len(doc["nodes"]), "op": "save", "target": None, "args": [{"$ref": lookup["id"]}],
                         "kwargs": [], "invoke": lookup["invoke"], "step": 0, "after": [], "source": ""})
    with pytest.raises(ValidationError) as err:
        validate(json.dumps(doc), setup.spec)
    assert err.value.code == "attribute_not_allowed"


# ----- dry_check and dry_run_key -----------------------------------------------------------------
def _keyed(graph: Graph, seq: int = 6, rows: list[slice | None] | None = None) -> str:
    from sandbox_client.interpreter import DryRun, dry_run_key

    return dry_run_key(graph, DryRun(template=None, meta_model=None, seq=seq, rows=rows))  # type: ignore[arg-type]


def test_dry_run_key_ignores_the_prompts_and_nothing_else(setup: Setup) -> None:
    def graph(prompt: str, layer: int = 0, **options: Any) -> Graph:
        with setup.lm.trace(prompt, **options) as tracer:
            setup.blocks()[layer].output[:, -1].save()
        return tracer.graph

    base = _keyed(graph("The Eiffel Tower"))
    assert _keyed(graph("A different prompt")) == base
    assert _keyed(graph("The Eiffel Tower", layer=1)) != base
    assert _keyed(graph("The Eiffel Tower"), seq=7) != base
    assert _keyed(graph("The Eiffel Tower"), rows=[slice(0, 1)]) != base
    assert _keyed(graph("The Eiffel Tower", output_hidden_states=True)) != base   # invoke keywords count
