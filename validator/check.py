"""The entry point: ``validate(graph, model_spec, limits)``. Pure: no I/O, nothing runs.

    checked = validate(request_text, spec)          # or a Graph
    run_graph(checked.graph, ...)                   # the server runs only validated graphs

Order of checks: size of the text, parse, node count, generate options, every value (depth,
lengths, tensor bytes), every node (allowlist, arguments, paths, bindings, writes to weights),
the inputs, then time order. The first failure raises ValidationError.
"""
from __future__ import annotations

import re
from typing import Any

import torch

from sandbox_client.errors import ModulePathError, OrderError, TraceError
from sandbox_client.graph import Graph, GraphFormatError

from .allowlist import GENERATE_OPTIONS
from .order import check_order, check_skips
from .rules import RuleContext, check_node
from .spec import ModelSpec
from .types import Limits, ValidatedGraph, ValidationError
from .values import ValueStats, is_finite_number

_LM_FORWARD_OPTIONS = frozenset({"output_attentions", "output_hidden_states"})


def validate(graph: Graph | str | bytes, spec: ModelSpec, limits: Limits | None = None) -> ValidatedGraph:
    """Check ``graph`` against every rule; return it wrapped, or raise ValidationError.

    Static only: nothing runs. The dry run on meta tensors (shape errors, exact result bytes) is the
    interpreter's: ``sandbox_client.interpreter.validate_and_dry_run``.
    """
    limits = limits or Limits()
    parsed = graph if isinstance(graph, Graph) else parse(graph, limits)
    if len(parsed.nodes) > limits.max_nodes:
        raise ValidationError("too_many_nodes", f"{len(parsed.nodes)} nodes (limit {limits.max_nodes})")
    check_options(parsed, limits)   # before the nodes: their step bounds read max_new_tokens
    stats = ValueStats(limits)
    for inv in parsed.invokes:
        stats.walk(inv.args, None)
        stats.walk(inv.kwargs, None)
    stats.walk(parsed.options, None)
    ctx = RuleContext(graph=parsed, spec=spec, limits=limits, weight_views=set())
    saves = 0
    for node in parsed.nodes:
        if node.args:
            stats.walk(node.args, node)
        if node.kwargs:
            stats.walk(node.kwargs, node)
        check_node(node, ctx)
        saves += node.op == "save"
    if saves > limits.max_saves:
        raise ValidationError("too_many_saves", f"{saves} saved values (limit {limits.max_saves})")
    rows = check_inputs(parsed, spec, limits)
    check_time_order(parsed, spec)
    checked = ValidatedGraph(graph=parsed, literal_tensor_bytes=stats.tensor_bytes, saves=saves, rows=rows)
    return checked


def parse(text: str | bytes, limits: Limits) -> Graph:
    """JSON text -> Graph, refusing oversized or malformed input before building anything big."""
    if not isinstance(text, (str, bytes)):
        raise ValidationError("format", "a graph must be JSON text")
    if len(text) > limits.max_request_bytes:
        raise ValidationError("request_too_large", f"the graph is {len(text)} bytes (limit {limits.max_request_bytes})")
    if isinstance(text, bytes):
        # the wire format is UTF-8; json.loads would also accept UTF-16/32, which the node count below cannot read
        try:
            text = text.decode("utf-8")
        except UnicodeDecodeError as err:
            raise ValidationError("format", f"the graph is not UTF-8 text: {err}") from None
    if _count_node_keys(text, limits.max_nodes + 1) > limits.max_nodes:
        raise ValidationError("too_many_nodes", f"more than {limits.max_nodes} nodes")
    try:
        return Graph.from_json(text)
    except GraphFormatError as err:
        text = str(err)
        code = ("version" if text.startswith("graph format version") else
                "depth" if "nested too deeply" in text else "format")
        raise ValidationError(code, str(err)) from None


# every spelling of an "op" key (whitespace before the colon, \\u escapes): one per node at least. Counting these
# before parsing refuses a huge graph in milliseconds instead of building all of its nodes.
_NODE_KEY = re.compile(r'"(?:o|\\u006[fF])(?:p|\\u0070)"[ \t\r\n]*:')


def _count_node_keys(text: str, stop: int) -> int:
    count = 0
    for _ in _NODE_KEY.finditer(text):
        count += 1
        if count >= stop:
            break
    return count


def check_inputs(graph: Graph, spec: ModelSpec, limits: Limits) -> int:
    """Each invoke's input must be a form the model takes, within size limits; returns the row count."""
    if not graph.invokes:
        raise ValidationError("input_invalid", "the graph has no input (no invoke)")
    if len(graph.invokes) > limits.max_invokes:
        raise ValidationError("input_invalid", f"{len(graph.invokes)} invokes (limit {limits.max_invokes})")
    if spec.kind != "language_model":
        return len(graph.invokes)
    vocab = spec.config.get("vocab_size")
    rows = 0
    for index, inv in enumerate(graph.invokes):
        if len(inv.args) != 1:
            raise ValidationError("input_invalid", f"invoke {index}: a language model takes exactly one input")
        if set(inv.kwargs) - _LM_FORWARD_OPTIONS or not all(isinstance(v, bool) for v in inv.kwargs.values()):
            raise ValidationError("input_invalid", f"invoke {index}: only output_attentions/output_hidden_states "
                                  "(booleans) may be passed to the forward")
        for row in _token_rows(inv.args[0], index):
            rows += 1
            if len(row) > limits.max_tokens_per_row:
                raise ValidationError("input_invalid", f"invoke {index}: {len(row)} tokens (limit "
                                      f"{limits.max_tokens_per_row})")
            if vocab is not None and any(not 0 <= t < vocab for t in row):
                raise ValidationError("input_invalid", f"invoke {index}: token ids must be in 0..{vocab - 1}")
    if rows > limits.max_batch_rows:
        raise ValidationError("input_invalid", f"{rows} rows in the batch (limit {limits.max_batch_rows})")
    return rows


def _token_rows(value: Any, index: int) -> list[list[int]]:
    if isinstance(value, str):
        return [[0] * len(value)]   # at most one token per character: a length bound, ids come from the server
    if isinstance(value, dict):
        if not set(value) <= {"input_ids", "attention_mask"} or "input_ids" not in value:
            raise ValidationError("input_invalid", f"invoke {index}: a dict input holds input_ids (+ attention_mask)")
        return _token_rows(value["input_ids"], index)
    if isinstance(value, torch.Tensor):
        if value.dtype not in (torch.int64, torch.int32) or value.dim() not in (1, 2):
            raise ValidationError("input_invalid", f"invoke {index}: token tensors are 1-D/2-D int64 or int32")
        return [[int(t) for t in row] for row in (value if value.dim() == 2 else value.unsqueeze(0)).tolist()]
    if isinstance(value, list) and value:
        if all(isinstance(v, str) for v in value):
            return [[0] * len(v) for v in value]
        if all(isinstance(v, int) and not isinstance(v, bool) for v in value):
            return [value]
        if all(isinstance(v, list) and all(isinstance(t, int) and not isinstance(t, bool) for t in v) for v in value):
            return value
    raise ValidationError("input_invalid", f"invoke {index}: input must be text, token ids or a dict of them")


def check_options(graph: Graph, limits: Limits) -> None:
    if graph.kind == "trace":
        if graph.options:
            raise ValidationError("option_not_allowed", "a trace takes no options")
        return
    for key, value in graph.options.items():
        expected = GENERATE_OPTIONS.get(key)
        if expected is None or isinstance(value, bool) != (expected is bool) or not isinstance(value, expected):
            raise ValidationError("option_not_allowed", f"generate option {key!r}={value!r} is not allowed; "
                                  f"allowed: {', '.join(GENERATE_OPTIONS)}")
        if isinstance(value, float) and not is_finite_number(value):
            raise ValidationError("option_not_allowed", f"generate option {key!r} must be finite")
    max_new = graph.options.get("max_new_tokens", 20)
    if not 1 <= max_new <= limits.max_new_tokens:
        raise ValidationError("max_new_tokens", f"max_new_tokens={max_new} (allowed 1..{limits.max_new_tokens})")


def check_time_order(graph: Graph, spec: ModelSpec) -> None:
    try:
        check_skips(graph)      # module paths were checked node by node in the rules
        check_order(graph)
    except ModulePathError as err:
        raise ValidationError("module_path", err.message, source=err.source) from None
    except OrderError as err:
        raise ValidationError("order", err.message, source=err.source) from None
    except TraceError as err:
        raise ValidationError("skip_nested", err.message, source=err.source) from None
