"""sandbox_server.cobatch and the worker's co-batching: each job of a merged batch gets what it gets alone.

The reference is always the same graph run alone (``lm.runner.run``, the path of a job run by itself).
Rows of equal length compare bitwise (the kernels see the same per-row work); a batch where some job has
left padding passes an attention mask for every row, so an unpadded job's rows take the masked attention
path and compare within 1e-5 relative.
"""
from __future__ import annotations

import dataclasses
from typing import Any

import pytest
import torch
from conftest import build_tiny

import sandbox_client as sc
from sandbox_client.graph import Graph, Ref
from sandbox_client.graph.merge import merge_graphs
from sandbox_client.interpreter.rows import SharedValueError, Withheld, narrow_isolated
from sandbox_server import cobatch
from sandbox_server.cobatch import ALONE_GRAD, ALONE_STOP, alone_reason, group_jobs

from .cobatchgraphs import WIDTH, edit_and_read, hidden, ids, layers, same_as_alone, trace
from .jobgraphs import Recorder


@pytest.fixture(scope="module", params=["gpt2", "llama"])
def lm(request: pytest.FixtureRequest, gpt2_tokenizer: Any) -> sc.LanguageModel:
    return sc.LanguageModel(build_tiny(request.param), tokenizer=gpt2_tokenizer)


# ----- merging ------------------------------------------------------------------------------------
def test_merge_renumbers_nodes_rewrites_refs_and_offsets_invokes(lm: sc.LanguageModel) -> None:
    a = trace(lm, edit_and_read, ids(1), ids(2))          # two invokes
    b = trace(lm, edit_and_read, ids(3))
    merged = merge_graphs([a, b])
    g = merged.graph
    assert len(g.invokes) == 3 and g.invokes[2] is b.invokes[0]
    assert [n.id for n in g.nodes] == list(range(len(a.nodes) + len(b.nodes)))
    base = len(a.nodes)
    for old, new in zip(b.nodes, g.nodes[base:], strict=True):
        assert new.op == old.op and new.invoke == (2 if old.invoke == 0 else 3 + 1)
        assert [r + base for r in old.refs()] == list(new.refs())
    assert all(n.invoke in (0, 1) for n in g.nodes[:base])
    assert merged.job_of(base - 1) == 0 and merged.job_of(base) == 1 and merged.job_of(None) is None
    assert Graph.from_json(g.to_json()) == g
    nested = merge_graphs([a, a]).graph.nodes[base + 1]
    assert all(isinstance(r, int) and r >= base for r in nested.refs())
    assert isinstance(Ref(1), Ref)


def test_nodes_outside_invokes_see_only_their_jobs_rows(lm: sc.LanguageModel) -> None:
    """invoke None (the whole batch alone) -> the job's group slice: sums over the batch see its rows only."""
    def body(rec: Any) -> None:
        layers(rec)[0].output.save()
    graphs = [trace(lm, body, ids(s, rows=r)) for s, r in ((1, 1), (2, 3), (3, 2))]
    assert all(n.invoke is None or n.invoke == 0 for g in graphs for n in g.nodes)
    run = same_as_alone(lm, graphs)
    assert not run.alone and run.attempts == 1
    assert [hidden(run.results[i][0]).shape[0] for i in range(3)] == [1, 3, 2]


# ----- same results as alone ----------------------------------------------------------------------
@pytest.mark.parametrize("n", [2, 5, 8])
def test_traces_of_equal_length_are_bitwise_the_same_as_alone(lm: sc.LanguageModel, n: int) -> None:
    graphs = [trace(lm, edit_and_read, ids(10 + i, rows=1 + i % 2)) for i in range(n)]
    assert group_jobs(lm.runner, graphs, 4096) == [list(range(n))]
    run = same_as_alone(lm, graphs)
    assert sorted(run.results) == list(range(n)) and run.attempts == 1


def test_padded_jobs_match_alone_within_float_rounding(lm: sc.LanguageModel) -> None:
    """Job 0 pads its short invoke to 7 alone too; job 1's rows (no padding alone) now get an attention mask."""
    graphs = [trace(lm, edit_and_read, ids(1, width=4), ids(2)), trace(lm, edit_and_read, ids(3))]
    assert group_jobs(lm.runner, graphs, 4096) == [[0, 1]]
    run = same_as_alone(lm, graphs, bitwise=False)
    assert sorted(run.results) == [0, 1]


def test_jobs_of_different_widths_or_options_are_not_merged(lm: sc.LanguageModel) -> None:
    graphs = [trace(lm, edit_and_read, ids(1)), trace(lm, edit_and_read, ids(2, width=5)),
              trace(lm, edit_and_read, ids(3))]
    assert group_jobs(lm.runner, graphs, 4096) == [[0, 2], [1]]
    assert group_jobs(lm.runner, graphs, WIDTH) == [[0], [1], [2]]    # max_batch_tokens: 7 tokens each


def test_generation_with_steps_matches_alone(lm: sc.LanguageModel) -> None:
    def make(seed: int, rows: int) -> Graph:
        rec = Recorder(lm.runner.module, lm.tokenizer)
        with rec.generate(ids(seed, rows=rows), max_new_tokens=4) as tracer:
            with tracer.all_steps():
                rec.lm_head.output[:, -1].argmax(-1).save()
            with tracer.step(1):
                layers(rec)[0].output = layers(rec)[0].output * 0
            tracer.result.save()
        return Graph.from_json(tracer.graph.to_json())
    graphs = [make(s, 1 + s % 2) for s in range(4)]
    assert group_jobs(lm.runner, graphs, 4096) == [[0, 1, 2, 3]]
    run = same_as_alone(lm, graphs)
    assert sorted(run.results) == [0, 1, 2, 3]
    assert all(len(run.results[i][max(run.results[i])].shape) == 2 for i in range(4))


def test_a_generation_that_would_have_ended_earlier_alone_is_detected(lm: sc.LanguageModel) -> None:
    """Merged, a job whose rows all hit end-of-sequence keeps stepping with the others: it must run alone."""
    def make(seed: int, rows: int) -> Graph:
        rec = Recorder(lm.runner.module, lm.tokenizer)
        with rec.generate(ids(seed, rows=rows), max_new_tokens=3) as tracer:
            tracer.result.save()
        return Graph.from_json(tracer.graph.to_json())
    merged = merge_graphs([make(1, 2), make(2, 1), make(3, 1)])
    eos = lm._module.config.eos_token_id
    sequences = torch.zeros(4, WIDTH + 3, dtype=torch.long)
    sequences[0, WIDTH] = sequences[1, WIDTH + 1] = eos      # job 0: both rows ended before the last step
    sequences[2, WIDTH + 2] = eos                            # job 1: ended at the last step, as alone
    assert cobatch._stopped_early(lm.runner, merged, sequences) == {0}


def test_gradients_stop_and_sampling_run_alone(lm: sc.LanguageModel) -> None:
    def grad(rec: Any) -> None:
        layers(rec)[1].output.grad.save()
        rec.lm_head.output[0, -1, 5].backward()
    rec = Recorder(lm.runner.module, lm.tokenizer)
    with rec.trace(ids(1)) as tracer:
        layers(rec)[0].output.save()
        tracer.stop()
    stop = Graph.from_json(tracer.graph.to_json())
    graphs = [trace(lm, grad, ids(1)), stop, trace(lm, edit_and_read, ids(2))]
    assert [alone_reason(g) for g in graphs] == [ALONE_GRAD, ALONE_STOP, None]
    assert group_jobs(lm.runner, graphs + [graphs[2]], 4096) == [[0], [1], [2, 3]]


def test_out_of_range_references_run_alone(lm: sc.LanguageModel) -> None:
    """Shifted into a merged graph, Ref(-1) or invoke 3 of a one-invoke job would name another job's node/rows."""
    base = trace(lm, edit_and_read, ids(1))
    for change in ({"invoke": 3}, {"invoke": -1}, {"args": (Ref(-1),)}):
        bad = Graph.from_json(base.to_json())
        node = next(n for n in bad.nodes if n.op == "save")
        bad.nodes[node.id] = dataclasses.replace(node, **change)  # type: ignore[arg-type]
        assert alone_reason(bad) == cobatch.ALONE_MALFORMED
        assert group_jobs(lm.runner, [base, bad, base], 4096) == [[0, 2], [1]]


# ----- hostile jobs -------------------------------------------------------------------------------
def test_indexing_outside_its_rows_fails_only_that_job(lm: sc.LanguageModel) -> None:
    def outside(rec: Any) -> None:
        hidden(layers(rec)[0].output)[5].save()      # 1 row alone: IndexError; 8 rows merged: still its own
    graphs = [trace(lm, edit_and_read, ids(1)), trace(lm, outside, ids(2)), trace(lm, edit_and_read, ids(3))]
    run = same_as_alone(lm, graphs)
    assert sorted(run.results) == [0, 2] and run.alone == [1] and run.attempts == 2
    with pytest.raises(sc.InterventionError, match="IndexError"):
        lm.runner.run(graphs[1])


def test_summing_over_the_batch_sees_only_its_rows(lm: sc.LanguageModel) -> None:
    def total(rec: Any) -> None:
        hidden(layers(rec)[1].output).sum(0).save()
        rec.lm_head.output.sum(dim=0).save()
    graphs = [trace(lm, total, ids(1, rows=2)), trace(lm, total, ids(2, rows=3)), trace(lm, total, ids(3))]
    run = same_as_alone(lm, graphs)
    assert sorted(run.results) == [0, 1, 2]


def test_writing_every_row_touches_only_its_own(lm: sc.LanguageModel) -> None:
    def wipe(rec: Any) -> None:
        hidden(layers(rec)[1].output)[:] = 0
        rec.lm_head.output[:, -1].save()

    def wipe_all(rec: Any) -> None:
        layers(rec)[2].output = layers(rec)[2].output * 0 + 1
        rec.lm_head.output[:, -1].save()
    graphs = [trace(lm, edit_and_read, ids(1)), trace(lm, wipe, ids(2, rows=2)), trace(lm, wipe_all, ids(3)),
              trace(lm, edit_and_read, ids(4))]
    run = same_as_alone(lm, graphs)
    assert sorted(run.results) == [0, 1, 2, 3]


def test_a_write_into_a_tensor_every_job_shares_sends_that_job_alone(lm: sc.LanguageModel) -> None:
    """Llama's rotary table has no batch dimension: one job zeroing it in place would reach every job."""
    if not hasattr(lm._module, "model"):
        pytest.skip("GPT-2 has no module output without the batch dimension")

    def rotary(rec: Any) -> None:
        rec.model.rotary_emb.output[0][:] = 0
        rec.lm_head.output[:, -1].save()
    graphs = [trace(lm, edit_and_read, ids(1)), trace(lm, rotary, ids(2)), trace(lm, edit_and_read, ids(3))]
    run = same_as_alone(lm, graphs)
    assert sorted(run.results) == [0, 2] and run.alone == [1] and "failed in the batch" in run.why[1]


def test_opaque_values_are_withheld_and_shared_tensors_recorded() -> None:
    cache, table, shared = object(), torch.ones(3, 2), []
    value = narrow_isolated({"logits": torch.arange(8.0).reshape(4, 2), "cache": cache, "table": table},
                            slice(1, 3), 4, shared)
    assert torch.equal(value["logits"], torch.tensor([[2.0, 3.0], [4.0, 5.0]]))
    assert value["table"] is table and shared == [table]
    withheld = value["cache"]
    assert isinstance(withheld, Withheld)
    for use in (lambda: withheld.key_cache, lambda: withheld[0], lambda: str(withheld), lambda: withheld == 1,
                lambda: bool(withheld), lambda: list(withheld)):
        with pytest.raises(SharedValueError):
            use()


def test_the_models_output_merges_but_its_cache_is_withheld(lm: sc.LanguageModel) -> None:
    """``lm.output`` holds a key/value cache of every job's rows: reading the logits is fine, the cache is not."""
    def logits(rec: Any) -> None:
        rec.output.logits[:, -1].save()

    def cache(rec: Any) -> None:
        rec.output.past_key_values.save()
    graphs = [trace(lm, logits, ids(1)), trace(lm, cache, ids(2)), trace(lm, logits, ids(3, rows=2))]
    run = same_as_alone(lm, graphs)
    assert sorted(run.results) == [0, 2] and run.alone == [1] and run.why[1] == "saved a value shared by the batch"


def test_a_job_reading_a_shared_tensor_without_writing_stays_merged(lm: sc.LanguageModel) -> None:
    if not hasattr(lm._module, "model"):
        pytest.skip("GPT-2 has no module output without the batch dimension")

    def read(rec: Any) -> None:
        (rec.lm_head.output[:, -1, :64] + rec.model.rotary_emb.output[0][0, -1].sum()).save()
    graphs = [trace(lm, edit_and_read, ids(1)), trace(lm, read, ids(2))]
    run = same_as_alone(lm, graphs)
    assert sorted(run.results) == [0, 1]


@pytest.mark.smollm2
@pytest.mark.slow
def test_smollm2_users_co_batched_get_what_they_get_alone() -> None:
    """The real model: four users' 9-token prompts (a read, an edit, a patch between two invokes, a lens) in
    one forward; each job's values are bitwise what it gets alone."""
    from sandbox_client.pretrained import smollm2_folder

    lm = sc.LanguageModel(smollm2_folder())

    def lens(rec: Any) -> None:
        rec.lm_head(rec.model.norm(rec.model.layers[20].output[:, -1])).argmax(-1).save()

    def patch(rec: Any) -> None:
        rec.model.layers[25].output[:, -1] = rec.model.layers[25].output[:, -1] * 0.0
        rec.lm_head.output[:, -1].softmax(-1).save()

    graphs = [trace(lm, edit_and_read, "The Eiffel Tower is in the city of"),
              trace(lm, patch, "The Colosseum is in the city of"),
              trace(lm, lens, "The Eiffel Tower is in the city of", "The Colosseum is in the city of"),
              trace(lm, edit_and_read, "The Colosseum is in the city of")]
    assert group_jobs(lm.runner, graphs, 4096) == [[0, 1, 2, 3]]
    run = same_as_alone(lm, graphs)
    assert sorted(run.results) == [0, 1, 2, 3] and run.attempts == 1
