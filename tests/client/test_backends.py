"""The backend seam: a finished trace goes to ``tracer``'s Backend: here, a real server (``remote=True``
on a local model, through tests/serverproc.py over HTTP), nowhere (RecordOnly), or a user's own.

References: the same user code run by a plain local sc.LanguageModel on the same weights (bitwise), and
raw forward-hook counts for "nothing ran".
"""
from __future__ import annotations

from typing import Any

import pytest
import torch
from conftest import build_tiny

import sandbox_client as sc
from sandbox_client.backends import LocalBackend, RecordOnly
from sandbox_client.graph import Graph

PROMPT = "The Eiffel Tower is in the city of"


@pytest.fixture(scope="module")
def twin(gpt2_tokenizer: Any, sandbox_server: tuple[Any, str]) -> tuple[sc.LanguageModel, sc.LanguageModel]:
    """(a plain local model, the same weights connected to the server's tiny-gpt2 for remote=True)."""
    server, key = sandbox_server
    local = sc.LanguageModel(build_tiny("gpt2"), tokenizer=gpt2_tokenizer)
    served = sc.LanguageModel(build_tiny("gpt2"), tokenizer=gpt2_tokenizer, served_as="tiny-gpt2",
                              host=server.url, api_key=key)
    return local, served


def experiment(lm: sc.LanguageModel, **how: Any) -> tuple[sc.Tracer, list[sc.Proxy]]:
    with lm.trace(PROMPT, **how) as tracer:
        lm.transformer.h[1].mlp.output[:, -1] = 0
        saved = [lm.transformer.h[2].output.save(), lm.lm_head.output[:, -1].softmax(-1).save()]
    return tracer, saved


def test_remote_true_on_a_local_model_runs_on_the_server_bitwise(twin: Any) -> None:
    local, served = twin
    _, want = experiment(local)
    handle_calls: list[int] = []
    handle = served.runner.module.transformer.h[2].register_forward_hook(lambda m, a, o: handle_calls.append(1))
    try:
        tracer, got = experiment(served, remote=True)
    finally:
        handle.remove()
    assert handle_calls == []                       # the local weights never ran: the server did
    assert tracer.job is not None and tracer.job.status() == "COMPLETED"
    for g, w in zip(got, want, strict=True):
        assert torch.equal(g.value, w.value)


def test_remote_true_non_blocking_returns_at_once_and_values_wait(twin: Any) -> None:
    local, served = twin
    _, want = experiment(local)
    tracer, got = experiment(served, remote=True, blocking=False)
    assert tracer.job is not None
    for g, w in zip(got, want, strict=True):
        assert torch.equal(g.value, w.value)
    assert tracer.job.status() == "COMPLETED"


def test_remote_generate_on_a_local_model(twin: Any) -> None:
    local, served = twin
    results = []
    for lm, how in ((local, {}), (served, {"remote": True})):
        with lm.generate(PROMPT, max_new_tokens=3, **how) as tracer:
            ids = tracer.result.save()
        results.append(ids.value)
    assert torch.equal(results[0], results[1])


def test_remote_true_without_a_served_name_says_what_to_write(gpt2_tokenizer: Any) -> None:
    lm = sc.LanguageModel(build_tiny("gpt2"), tokenizer=gpt2_tokenizer)
    with pytest.raises(sc.TraceError, match="served_as="):
        lm.trace(PROMPT, remote=True)


def test_a_local_model_of_another_architecture_is_refused_before_any_job(gpt2_tokenizer: Any,
                                                                          sandbox_server: Any) -> None:
    server, key = sandbox_server
    wrong = sc.LanguageModel(build_tiny("llama"), tokenizer=gpt2_tokenizer, served_as="tiny-gpt2",
                             host=server.url, api_key=key)
    with pytest.raises(sc.RemoteError) as err:
        wrong.trace(PROMPT, remote=True)
    assert err.value.code == "model_mismatch"


def test_blocking_false_applies_to_remote_runs_only(gpt2_tokenizer: Any) -> None:
    lm = sc.LanguageModel(build_tiny("gpt2"), tokenizer=gpt2_tokenizer)
    with pytest.raises(sc.TraceError, match="remote=True"):
        lm.trace(PROMPT, blocking=False)


def test_a_remote_model_cannot_run_here(sandbox_server: Any) -> None:
    server, key = sandbox_server
    remote = sc.RemoteModel("tiny-gpt2", host=server.url, api_key=key, verbose=False)
    with pytest.raises(sc.TraceError, match="no weights here"):
        remote.trace(PROMPT, remote=False)


def test_record_only_runs_nothing(gpt2_tokenizer: Any) -> None:
    lm = sc.LanguageModel(build_tiny("gpt2"), tokenizer=gpt2_tokenizer)
    calls: list[int] = []
    handle = lm.runner.module.register_forward_hook(lambda m, a, o: calls.append(1))
    try:
        tracer, saved = experiment(lm, backend=RecordOnly())
    finally:
        handle.remove()
    assert calls == [] and len(tracer.graph.nodes) > 0
    with pytest.raises(sc.ValueNotReadyError, match="not saved"):
        _ = saved[0].value


def test_a_users_own_backend_gets_the_finished_graph_and_its_values_are_the_results(gpt2_tokenizer: Any) -> None:
    lm = sc.LanguageModel(build_tiny("gpt2"), tokenizer=gpt2_tokenizer)
    seen: list[Graph] = []

    class Logging:
        def run(self, graph: Graph) -> dict[int, Any]:
            seen.append(graph)
            return LocalBackend(lm.runner).run(graph)

    tracer, got = experiment(lm, backend=Logging())
    _, want = experiment(lm)
    assert [seen[0].to_json()] == [tracer.graph.to_json()]
    for g, w in zip(got, want, strict=True):
        assert torch.equal(g.value, w.value)
