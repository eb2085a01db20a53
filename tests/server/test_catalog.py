"""sandbox_server.catalog: published info, reloads when a worker republishes, and full validation."""
from __future__ import annotations

import dataclasses
import threading
from pathlib import Path
from typing import Any

import pytest
import torch
from conftest import build_tiny

import sandbox_client as sc
from sandbox_client.graph import Graph, Invoke
from sandbox_client.interpreter.shapes import nbytes
from sandbox_server.catalog import Catalog, ModelNotReady, model_status
from sandbox_server.db import Database
from sandbox_server.modelinfo import clear_model_info
from validator import ValidationError

from .conftest import IDS, make_config, publish_tiny


def saved_bytes(tracer: sc.Tracer) -> int:
    """The independent reference: the sizes of the values a local run of the same graph saved."""
    return sum(nbytes(tracer.result_of(n.args[0].id)) for n in tracer.graph.nodes if n.op == "save")


@pytest.fixture
def catalog(published: Path) -> Catalog:
    return Catalog(make_config(published))


def test_info_follows_the_ready_file(tmp_path: Path, gpt2_tokenizer: Any) -> None:
    catalog = Catalog(make_config(tmp_path))
    db = Database(tmp_path / "sandbox.db")
    assert catalog.info("tiny-gpt2") is None and model_status(db, catalog, "tiny-gpt2") == "loading"
    with pytest.raises(ModelNotReady):
        catalog.validate_job("tiny-gpt2", "{}")
    publish_tiny(tmp_path, gpt2_tokenizer, description="first")
    first = catalog.info("tiny-gpt2")
    assert first is not None and first.info["description"] == "first"
    assert catalog.info("tiny-gpt2") is first                       # cached while "ready" is unchanged
    assert model_status(db, catalog, "tiny-gpt2") == "ready"
    clear_model_info(tmp_path / "models" / "tiny-gpt2")             # the worker restarts
    assert catalog.info("tiny-gpt2") is None
    publish_tiny(tmp_path, gpt2_tokenizer, description="second")
    second = catalog.info("tiny-gpt2")
    assert second is not None and second.info["description"] == "second"


def test_result_size_is_exact(catalog: Catalog, local_lm: sc.LanguageModel) -> None:
    with local_lm.trace(IDS) as tracer:
        local_lm.transformer.h[1].output[:, -1].save()
        local_lm.lm_head.output.save()
        local_lm.lm_head(local_lm.transformer.ln_f.output).argmax(-1).save()   # an ad hoc call: the meta model
    checked = catalog.validate_job("tiny-gpt2", tracer.graph.to_json())
    assert checked.result_bytes == saved_bytes(tracer) == 64 * 4 + 6 * 50257 * 4 + 6 * 8
    assert checked.rows == 1 and checked.graph.kind == "trace"


def test_text_prompts_are_tokenized_for_the_size(catalog: Catalog, local_lm: sc.LanguageModel) -> None:
    with local_lm.trace() as tracer:
        with tracer.invoke("The Eiffel Tower is in the city of"):
            local_lm.transformer.h[0].output.save()
        with tracer.invoke(["Hello", "a much longer second prompt than the first one"]):
            local_lm.lm_head.output[:, -1].save()
    checked = catalog.validate_job("tiny-gpt2", tracer.graph.to_json())
    assert checked.rows == 3
    assert checked.result_bytes == saved_bytes(tracer)


def test_generation_size(catalog: Catalog, local_lm: sc.LanguageModel) -> None:
    with local_lm.generate("Hello there", max_new_tokens=3) as tracer:
        local_lm.lm_head.output[:, -1].save()
        tracer.result.save()
    checked = catalog.validate_job("tiny-gpt2", tracer.graph.to_json())
    assert checked.graph.kind == "generate" and checked.result_bytes is not None and checked.result_bytes > 0


def test_shape_errors_are_found_before_running(catalog: Catalog, gpt2_tokenizer: Any) -> None:
    wide = sc.LanguageModel(build_tiny("gpt2", width=128), tokenizer=gpt2_tokenizer)
    with wide.trace(IDS) as tracer:      # fine on a 128-wide model, not on the served 64-wide one
        wide.transformer.h[0].output.reshape(6, 128).save()
    with pytest.raises(ValidationError) as err:
        catalog.validate_job("tiny-gpt2", tracer.graph.to_json())
    assert err.value.code == "shape" and "test_catalog.py" in err.value.source and "reshape" in err.value.source


def test_result_limit_uses_the_exact_size(published: Path, local_lm: sc.LanguageModel) -> None:
    from validator import Limits

    with local_lm.trace(IDS) as tracer:
        local_lm.lm_head.output.save()
    size = saved_bytes(tracer)
    assert Catalog(make_config(published, limits=Limits(max_result_bytes=size))).validate_job(
        "tiny-gpt2", tracer.graph.to_json()).result_bytes == size
    with pytest.raises(ValidationError) as err:
        Catalog(make_config(published, limits=Limits(max_result_bytes=size - 1))).validate_job(
            "tiny-gpt2", tracer.graph.to_json())
    assert err.value.code == "result_too_large"


def test_text_without_a_tokenizer_is_input_invalid(tmp_path: Path, local_lm: sc.LanguageModel) -> None:
    publish_tiny(tmp_path, None)
    catalog = Catalog(make_config(tmp_path))
    with local_lm.trace("some text") as tracer:
        local_lm.lm_head.output.save()
    with pytest.raises(ValidationError) as err:
        catalog.validate_job("tiny-gpt2", tracer.graph.to_json())
    assert err.value.code == "input_invalid"
    with local_lm.trace(IDS) as tracer:          # token ids need no tokenizer
        local_lm.lm_head.output.save()
    assert catalog.validate_job("tiny-gpt2", tracer.graph.to_json()).result_bytes == saved_bytes(tracer)


def test_concurrent_validation(catalog: Catalog, local_lm: sc.LanguageModel) -> None:
    prompts = [f"prompt number {i} " * (i + 1) for i in range(6)]
    texts, expected = [], []
    for p in prompts:
        with local_lm.trace(p) as tracer:
            local_lm.transformer.h[0].output.save()
        texts.append(tracer.graph.to_json())
        expected.append(saved_bytes(tracer))
    got: dict[int, int | None] = {}

    def check(i: int) -> None:
        for _ in range(3):
            got[i] = catalog.validate_job("tiny-gpt2", texts[i]).result_bytes
    threads = [threading.Thread(target=check, args=(i,)) for i in range(len(texts))]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert [got[i] for i in range(len(texts))] == expected


def test_warm_builds_published_models(catalog: Catalog) -> None:
    catalog.warm()      # "sleepy" is not published: skipped without error
    assert catalog.info("tiny-gpt2") is not None and catalog.info("sleepy") is None
    assert torch.get_default_device().type == "cpu"      # building on the meta device left no global state


@pytest.mark.parametrize("value", ["", [""], torch.zeros(1, 0, dtype=torch.long), torch.zeros(0, 3, dtype=torch.long),
                                   {"input_ids": [[1, 2]], "attention_mask": [[0, 0, 1]]}])
def test_empty_or_inconsistent_inputs_are_input_invalid(catalog: Catalog, logits_graph: str, value: Any) -> None:
    graph = Graph.from_json(logits_graph)
    text = dataclasses.replace(graph, invokes=[Invoke(args=(value,), kwargs={})]).to_json()
    with pytest.raises(ValidationError) as err:
        catalog.validate_job("tiny-gpt2", text)
    assert err.value.code == "input_invalid"


# ----- the dry-run cache -------------------------------------------------------------------------
def _count_dry_runs(monkeypatch: pytest.MonkeyPatch) -> list[int]:
    import sandbox_server.catalog as catalog_module

    calls: list[int] = []
    real = catalog_module.dry_check

    def counting(*args: Any, **kwargs: Any) -> Any:
        calls.append(1)
        return real(*args, **kwargs)

    monkeypatch.setattr(catalog_module, "dry_check", counting)
    return calls


def _last_token_graph(lm: sc.LanguageModel, ids: torch.Tensor, position: int = -1) -> str:
    with lm.trace(ids) as tracer:
        lm.transformer.h[1].output[:, position].save()
        lm.lm_head.output[:, -1].save()
    return tracer.graph.to_json()


def test_the_same_experiment_on_other_prompts_is_dry_run_once(catalog: Catalog, local_lm: sc.LanguageModel,
                                                              monkeypatch: pytest.MonkeyPatch) -> None:
    calls = _count_dry_runs(monkeypatch)
    sizes = [catalog.validate_job("tiny-gpt2", _last_token_graph(local_lm, IDS + k)).result_bytes for k in range(3)]
    assert len(calls) == 1 and sizes == [64 * 4 + 50257 * 4] * 3
    catalog.validate_job("tiny-gpt2", _last_token_graph(local_lm, IDS[:, :4]))      # another token count
    catalog.validate_job("tiny-gpt2", _last_token_graph(local_lm, IDS, position=0))  # another graph
    assert len(calls) == 3


def test_a_cached_pass_never_covers_shapes_it_was_not_checked_on(catalog: Catalog,
                                                                 local_lm: sc.LanguageModel) -> None:
    fine = _last_token_graph(local_lm, IDS, position=5)                              # 6 tokens: fine
    catalog.validate_job("tiny-gpt2", fine)
    short = Graph.from_json(fine)
    short.invokes = [Invoke(args=(IDS[:, :4],))]                                     # 4 tokens: out of range
    with pytest.raises(ValidationError) as err:
        catalog.validate_job("tiny-gpt2", short.to_json())
    assert err.value.code == "shape"


def test_refused_graphs_are_checked_in_full_every_time(catalog: Catalog, gpt2_tokenizer: Any,
                                                       monkeypatch: pytest.MonkeyPatch) -> None:
    calls = _count_dry_runs(monkeypatch)
    wide = sc.LanguageModel(build_tiny("gpt2", width=128), tokenizer=gpt2_tokenizer)
    with wide.trace(IDS) as tracer:
        wide.transformer.h[0].output.reshape(6, 128).save()
    for _ in range(2):
        with pytest.raises(ValidationError):
            catalog.validate_job("tiny-gpt2", tracer.graph.to_json())
    assert len(calls) == 2


def test_the_cache_keeps_the_most_recently_used() -> None:
    from sandbox_server.catalog import DryRunCache

    cache = DryRunCache(size=2)
    cache.put("a", 1)
    cache.put("b", 2)
    assert cache.get("a") == 1
    cache.put("c", 3)
    assert (cache.get("a"), cache.get("b"), cache.get("c")) == (1, None, 3)
