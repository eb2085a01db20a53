"""Dry runs on meta tensors give the shapes a real run gives, and catch shape errors before running."""
from __future__ import annotations

import resource

import pytest
import torch
from conftest import build_tiny

import sandbox_client as sc
from sandbox_client.backends import RecordOnly
from sandbox_client.interpreter import DryRun, ShapeTemplate, dry_run, meta_copy, validate_and_dry_run
from validator import Limits, ModelSpec, ValidationError

ARCHS = ("gpt2", "llama", "qwen2")


@pytest.fixture(scope="module", params=ARCHS)
def setup(request: pytest.FixtureRequest):
    hf = build_tiny(request.param)
    template = ShapeTemplate.probe(hf, lambda b, t: {"input_ids": torch.randint(0, 1000, (b, t))})
    return request.param, hf, sc.LanguageModel(hf), template, meta_copy(hf)


def blocks(lm: sc.LanguageModel, arch: str):
    return lm.transformer.h if arch == "gpt2" else lm.model.layers


def final_norm(lm: sc.LanguageModel, arch: str):
    return lm.transformer.ln_f if arch == "gpt2" else lm.model.norm


def record(lm, ids, body):
    with lm.trace(ids, backend=RecordOnly()) as tracer:
        saved = body()
    return tracer.graph, saved


@pytest.mark.parametrize("batch, seq", [(1, 4), (3, 11)])
def test_dry_run_shapes_equal_real_run(setup, batch: int, seq: int) -> None:
    arch, hf, lm, template, meta = setup
    ids = torch.randint(0, 1000, (batch, seq))

    def body():
        h = blocks(lm, arch)[1].output
        return [h.save(), lm.lm_head(final_norm(lm, arch)(h))[:, -1].topk(5).indices.save(),
                blocks(lm, arch)[0].mlp.output.mean(-1).save(), lm.output.logits.softmax(-1).save()]

    graph, saved = record(lm, ids, body)
    shapes = dry_run(graph, template, meta, batch=batch, seq=seq)
    real = sc.LanguageModel(hf).runner.run(graph)
    for proxy in saved:
        assert shapes[proxy._id].shape == real[proxy._id].shape
        assert shapes[proxy._id].dtype == real[proxy._id].dtype
        assert shapes[proxy._id].device.type == "meta"


def test_shape_error_is_reported_before_running(setup) -> None:
    arch, hf, lm, template, meta = setup
    graph, _ = record(lm, torch.randint(0, 1000, (1, 5)), lambda: blocks(lm, arch)[0].output[:, :, 999].save())
    with pytest.raises(ValidationError) as err:
        dry_run(graph, template, meta, batch=1, seq=5)
    assert err.value.code == "shape" and "test_shapes.py" in err.value.source


def test_wrong_replacement_shape_is_refused(setup) -> None:
    arch, hf, lm, template, meta = setup

    def body():
        blocks(lm, arch)[0].output = torch.zeros(2, 2)

    graph, _ = record(lm, torch.randint(0, 1000, (1, 5)), body)
    with pytest.raises(ValidationError, match="replacement") as err:
        dry_run(graph, template, meta, batch=1, seq=5)
    assert err.value.code == "shape"


def test_validate_with_dry_run_bounds_the_result_exactly(setup) -> None:
    arch, hf, lm, template, meta = setup
    spec = ModelSpec.from_module(hf)
    graph, _ = record(lm, torch.randint(0, 1000, (2, 6)), lambda: lm.output.logits.save())
    checked = validate_and_dry_run(graph.to_json(), spec, dry=DryRun(template, meta, seq=6))
    assert checked.result_bytes == 2 * 6 * hf.config.vocab_size * 4
    with pytest.raises(ValidationError) as err:
        validate_and_dry_run(graph.to_json(), spec, Limits(max_result_bytes=1000), dry=DryRun(template, meta, seq=6))
    assert err.value.code == "result_too_large"


def test_scan_gives_meta_values_with_real_shapes(setup) -> None:
    arch, hf, lm, template, meta = setup
    with lm.scan() as tracer:
        with tracer.invoke([5, 6, 7, 8]):
            a = blocks(lm, arch)[1].output.save()
        with tracer.invoke([[1, 2], [3, 4]]):
            b = lm.output.logits[:, -1].save()
    assert a.value.shape == (1, 4, hf.config.hidden_size if arch != "gpt2" else hf.config.n_embd)
    assert b.value.shape == (2, hf.config.vocab_size)
    assert a.value.device.type == "meta"


def test_validate_bounds_extra_activation_memory(setup) -> None:
    arch, hf, lm, template, meta = setup
    spec = ModelSpec.from_module(hf)

    def body():
        h = blocks(lm, arch)[0].output
        return [(h.unsqueeze(-1) * h.unsqueeze(-2)).sum().save()]   # a (B, T, D, D) intermediate

    graph, _ = record(lm, torch.randint(0, 1000, (1, 8)), body)
    width = hf.config.hidden_size if arch != "gpt2" else hf.config.n_embd
    checked = validate_and_dry_run(graph.to_json(), spec, dry=DryRun(template, meta, seq=8))
    assert checked.result_bytes == 4
    with pytest.raises(ValidationError) as err:
        validate_and_dry_run(graph.to_json(), spec, Limits(max_extra_activation_bytes=8 * width * width * 4 - 1),
                 dry=DryRun(template, meta, seq=8))
    assert err.value.code == "activation_memory"


def test_every_recorded_feature_graph_passes_the_dry_run() -> None:
    """Literals from the request, gradients and user functions all survive a dry run on meta tensors."""
    from graph_corpus import recorded_graphs, tiny_model

    texts, spec = recorded_graphs()
    hf = tiny_model()
    template = ShapeTemplate.probe(hf, lambda b, t: {"input_ids": torch.randint(0, 1000, (b, t))})
    dry = DryRun(template, meta_copy(hf), seq=6)
    for name, text in texts.items():
        if not name.startswith("refused"):
            assert validate_and_dry_run(text, spec, dry=dry).result_bytes is not None, name


def test_user_function_loops_are_time_bounded_in_a_dry_run(setup) -> None:
    arch, hf, lm, template, meta = setup

    def spin(h):
        for i in range(999_999):  # noqa: B007 (user functions may not use _names)
            h = h @ torch.ones(64, 64)
        return h

    graph, _ = record(lm, torch.randint(0, 1000, (1, 4)), lambda: sc.apply(spin, blocks(lm, arch)[0].output).save())
    import time
    start = time.monotonic()
    with pytest.raises(ValidationError, match="time limit"):
        dry_run(graph, template, meta, batch=1, seq=4)
    assert time.monotonic() - start < 10


def make_big(h):
    keep = []
    for _ in range(8):
        keep.append(torch.ones(2**26))   # 256 MB each, were it real
    return h * 0 + len(keep)


def test_dry_run_factories_allocate_nothing_real(setup) -> None:
    """Factories inside sc.apply (and in graph nodes) run on the meta device during a dry run (the server's
    web tier runs dry runs: a request must not make it allocate gigabytes)."""
    arch, hf, lm, template, meta = setup

    def body():
        return [sc.apply(make_big, blocks(lm, arch)[0].output).save()]

    graph, saved = record(lm, torch.randint(0, 1000, (1, 5)), body)
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss   # KiB
    shapes = dry_run(graph, template, meta, batch=1, seq=5)
    assert all(shapes[p._id].device.type == "meta" for p in saved)
    assert resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - peak < 2**20   # < 1 GiB more (2 GiB if real)
