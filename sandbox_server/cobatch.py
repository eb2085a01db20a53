"""Co-batching: run several users' compatible jobs as ONE forward (or one generation) of the model.

    groups = group_jobs(runner, graphs, max_batch_tokens=4096)     # [[0, 2, 3], [1]]: indices into graphs
    run = run_together(runner, [graphs[i] for i in groups[0]])
    run.results[k]        # {node id: saved value} of the k-th job, exactly as runner.run(graph) returns
    run.alone             # indices of jobs that must run by themselves (then ``run.why[k]`` says why)

How. ``merge_graphs`` (``sandbox_client.graph.merge``) concatenates the jobs' invokes (each job keeps
its invokes' order), renumbers every node (``Ref``s rewritten everywhere in args/kwargs, nested, and in
``after``) and offsets each node's ``invoke``. A node with ``invoke`` None sees the whole batch in a run
of its own job; here it must see only its job's rows, so the row list gets one extra "group" slice per
job covering that job's contiguous rows, and such nodes point at it. The batch is built by the model's
public runner (``LanguageModelRunner.tokens``/``batch``/``run``, the path of a job run alone) on the
merged invokes and run with ``Batch(isolated=True)``: the executor then cuts every value a node reads to
the node's rows (what cannot be cut, an opaque object such as a key/value cache or a tensor without the
batch dimension such as a rotary table, becomes ``Withheld``: any use, reading or writing in place,
fails, and the job runs again alone), cuts the generated ids of ``tracer.result`` too, and writes
(``set_output``, ``skip``, in-place edits of the narrowed views) touch only the node's rows. Saved
values are split back per job by the node-id mapping, so values, errors and logs reach only their
job.

Isolation relies on the model keeping batch rows independent (true of causal LMs in eval mode:
attention is masked per row, normalizations are per position); what a row sees of the others is
only what the model itself mixes, which is nothing.

What is compatible (``batch_key``): same kind; for generate identical options; identical invoke
keyword options; the same padded width alone (so every saved shape equals the one of a run alone and
no job's rows gain extra left padding). Rows of equal length give bitwise the results of a run alone
where the kernels do; when some job has padding (invokes of different lengths), the merged run passes
an attention mask for all, so an unpadded job's rows go through the masked attention path and differ
by float rounding (~1e-6 relative): the reduction shapes and kernels change, not the maths.

What runs alone, and why (``batch_key`` returns None):
- gradients (``.grad``, ``.backward()``): a backward frees the autograd graph, so a second job's backward
  would need what the first freed; the grad hooks also fire with the whole batch's gradient.
- ``stop()``: ``StopForward`` would end every job's forward at one job's wish.
- ``.inputs``: module keyword arguments hold tensors whose first dimension can equal the merged batch by
  chance (``cache_position``) and would be cut wrongly.
- ``do_sample`` generation: the random draws of one job would depend on the others.
- graphs without invokes, and graphs with a reference out of range (a node id not earlier than the node,
  an invoke index it does not have): shifted, it could name another job's node or rows.
After a merged generation a job whose every row produced the end-of-sequence token before the last
step would, alone, have stopped earlier (fewer steps, a shorter result): it is run again alone. A job
that saved a ``Withheld`` value is run again alone.

Failures: if the merged run raises an error the executor blames on a node (``SandboxError.node_id``),
that node's job is taken out and the others run merged again; the blamed job runs alone (where it
gets its own, genuine error, or succeeds if only the sharing hurt it). An error that cannot be blamed
on a node (the model itself failed, memory) sends every job to run alone. ``JobAborted`` (deadline,
cancel) is not handled here: the worker decides (``ModelWorker.run_batch``: one deadline of
``timeout_s`` per merged run with every member's clock restarted; on timeout every member runs alone
with its own limit; a cancel ends that job CANCELLED and the rest run merged again).
"""
from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import torch

from sandbox_client.errors import SandboxError
from sandbox_client.graph import Graph, encode_value
from sandbox_client.graph.merge import Merged, job_invoke_bounds, merge_graphs
from sandbox_client.graph.walk import leaves
from sandbox_client.interpreter import Executor, LanguageModelRunner, Withheld, deliver_result, needs_grad

#: why a graph runs alone (batch_key's reasons, also used in logs and tests)
ALONE_GRAD = "gradients"
ALONE_STOP = "stop()"
ALONE_INPUTS = ".inputs"
ALONE_SAMPLING = "sampling"
ALONE_NO_INVOKE = "no invoke"
ALONE_MALFORMED = "out-of-range node or invoke reference"


@dataclass
class BatchRun:
    """The outcome of ``run_together``: saved values per job index, or that the job must run alone."""

    results: dict[int, dict[int, Any]] = field(default_factory=dict)
    alone: list[int] = field(default_factory=list)
    why: dict[int, str] = field(default_factory=dict)
    attempts: int = 0          # merged runs made (1 when nothing failed)


# ----- compatibility ------------------------------------------------------------------------------
def alone_reason(graph: Graph) -> str | None:
    """Why ``graph`` may not share a batch (see the module docstring), or None."""
    if not graph.invokes:
        return ALONE_NO_INVOKE
    if not _self_contained(graph):
        return ALONE_MALFORMED
    if needs_grad(graph):
        return ALONE_GRAD
    ops = {n.op for n in graph.nodes}
    if "stop" in ops:
        return ALONE_STOP
    if "inputs" in ops:
        return ALONE_INPUTS
    if graph.kind == "generate" and graph.options.get("do_sample"):
        return ALONE_SAMPLING
    return None


def _self_contained(graph: Graph) -> bool:
    """Every reference stays inside the graph: node refs to earlier nodes, invokes to its own invokes.

    Alone, an out-of-range reference fails (or, for an invoke index past the end, means the whole batch);
    shifted into a merged graph it could name another job's node or rows.
    """
    count = len(graph.invokes)
    for index, node in enumerate(graph.nodes):
        if node.id != index or not all(0 <= r < index for r in node.refs()):
            return False
        if node.invoke is not None and not 0 <= node.invoke < count:
            return False
    return True


def batch_key(runner: LanguageModelRunner, graph: Graph) -> tuple[str, int, int] | None:
    """(compatibility key, rows, padded width) of ``graph``; None when it must run alone."""
    if alone_reason(graph) is not None:
        return None
    tokens, _ = runner.tokens(graph.invokes)
    rows, width = (int(d) for d in tokens.input_ids.shape)
    options = json.dumps(encode_value(graph.options), sort_keys=True) if graph.kind == "generate" else ""
    kwargs = json.dumps([encode_value(inv.kwargs) for inv in graph.invokes[:1]], sort_keys=True)
    return (f"{graph.kind}|{width}|{options}|{kwargs}", rows, width)


def group_jobs(runner: LanguageModelRunner, graphs: Sequence[Graph], max_batch_tokens: int) -> list[list[int]]:
    """Indices of ``graphs`` in groups that may run merged (claim order kept); singletons run alone.

    A group's rows x padded width stays within ``max_batch_tokens`` (a single job is never refused by it).
    """
    groups: list[list[int]] = []
    open_groups: dict[str, tuple[list[int], int]] = {}   # key -> (group, tokens so far)
    for i, graph in enumerate(graphs):
        key = batch_key(runner, graph)
        if key is None:
            groups.append([i])
            continue
        name, rows, width = key
        tokens = rows * width
        current = open_groups.get(name)
        if current is not None and current[1] + tokens <= max_batch_tokens:
            current[0].append(i)
            open_groups[name] = (current[0], current[1] + tokens)
        else:
            group = [i]
            groups.append(group)
            open_groups[name] = (group, tokens)
    return groups


# ----- running ------------------------------------------------------------------------------------
def run_merged(runner: LanguageModelRunner, merged: Merged) -> tuple[list[dict[int, Any]], torch.Tensor | None]:
    """Run ``merged`` once; returns each job's {node id: saved value} and the generated ids (generate)."""
    graph = merged.graph
    tokens, rows = runner.tokens(graph.invokes)
    starts = [r.start for r in rows if r is not None]
    stops = [r.stop for r in rows if r is not None]
    bounds = job_invoke_bounds(merged)
    rows = [*rows, *(slice(starts[a], stops[b - 1]) for a, b in bounds)]
    sequences: list[torch.Tensor] = []

    def on_result(executor: Executor, output: Any) -> None:
        sequences.append(getattr(output, "sequences", output))
        deliver_result(executor, output)
    batch = runner.batch(graph, tokens, rows)
    batch.isolated = True
    values = runner.run(graph, batch, on_result if graph.kind == "generate" else None)
    per_job: list[dict[int, Any]] = [{} for _ in merged.starts]
    for node_id, value in values.items():
        j = merged.job_of(node_id)
        assert j is not None
        per_job[j][node_id - merged.starts[j]] = value
    return per_job, (sequences[0] if sequences else None)


def run_together(runner: LanguageModelRunner, graphs: Sequence[Graph]) -> BatchRun:
    """Run ``graphs`` merged; blamed or unfit jobs are left to run alone (see the module docstring)."""
    out = BatchRun()
    pending = list(range(len(graphs)))
    while len(pending) > 1:
        merged = merge_graphs([graphs[i] for i in pending])
        out.attempts += 1
        try:
            per_job, sequences = run_merged(runner, merged)
        except SandboxError as exc:
            j = merged.job_of(exc.node_id)
            if j is None:
                _all_alone(out, pending, f"unattributed {exc.code}")
                return out
            out.alone.append(pending.pop(j))
            out.why[out.alone[-1]] = f"failed in the batch ({exc.code})"
            continue
        except Exception as exc:
            _all_alone(out, pending, f"unattributed {type(exc).__name__}")
            return out
        early = _stopped_early(runner, merged, sequences)
        for j, index in enumerate(pending):
            if _holds_withheld(per_job[j]):
                out.alone.append(index)
                out.why[index] = "saved a value shared by the batch"
            elif j in early:
                out.alone.append(index)
                out.why[index] = "its generation ended early"
            else:
                out.results[index] = per_job[j]
        return out
    out.alone.extend(pending)
    for i in pending:
        out.why[i] = "no partner left"
    return out


def _all_alone(out: BatchRun, pending: list[int], why: str) -> None:
    for i in pending:
        out.alone.append(i)
        out.why[i] = why


def _stopped_early(runner: LanguageModelRunner, merged: Merged, sequences: torch.Tensor | None) -> set[int]:
    """Jobs whose every row ended (end-of-sequence) before the merged generation's last step."""
    if sequences is None:
        return set()
    eos = runner.eos_ids()
    if not eos:
        return set()
    tokens, rows = runner.tokens(merged.graph.invokes)
    width = tokens.input_ids.shape[1]
    generated = sequences[:, width:-1]          # all but the last step's token
    if generated.shape[1] == 0:
        return set()
    ended = torch.isin(generated, torch.tensor(eos, device=generated.device)).any(dim=1)
    early: set[int] = set()
    for j, (a, b) in enumerate(job_invoke_bounds(merged)):
        first, last = rows[a], rows[b - 1]
        assert first is not None and last is not None
        if bool(ended[first.start:last.stop].all()):
            early.add(j)
    return early


def _holds_withheld(value: Any) -> bool:
    return any(isinstance(v, Withheld) for v in leaves(value))
