"""Shapes without compute: a per-model template of every module's input/output shapes as a
function of batch size B and sequence length T, and a dry run of a graph's own nodes on meta
tensors against it. Nothing runs the model per request.

    template = ShapeTemplate.probe(hf_model, token_batch)    # once per model (two tiny forwards)
    shapes = dry_run(graph, template, meta_model, batch=2, seq=9)
    shapes[node_id]                                          # (torch.Size, dtype) or None

Each tensor dimension in the template is a constant, B or T (learned from probes at two
different (B, T)); anything else is marked unknown and nodes depending on it are skipped.
The dry run replays the module events in the order the model calls them, firing the graph's
executor with meta tensors, so shape errors, wrong replacements and result sizes are known
before a GPU is touched.
"""
from __future__ import annotations

import copy
import itertools
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from validator.types import ValidationError

from ..graph import Graph
from .executor import Executor, StopForward

Dim = int | str            # a constant, "B", "T" or "?"
Struct = Any               # ("tensor", dims, dtype) | ("seq", type, [Struct]) | ("map", type, {k: Struct}) | None
MakeBatch = Callable[[int, int], dict[str, Any]]
_PROBES = ((1, 3), (2, 5))
USER_FUNCTION_SECONDS = 2.0   # budget of user-function loops during one dry run


@dataclass(frozen=True)
class ShapeTemplate:
    """Module events in call order, each with the structure of its value."""

    events: tuple[tuple[str, str, Struct], ...]       # (path, 'input'|'output', structure)

    @classmethod
    def probe(cls, module: nn.Module, make_batch: MakeBatch) -> ShapeTemplate:
        """Two forwards at different (B, T), hooks on every module; dims fitted to B/T/constants."""
        runs = [_record(module, make_batch(b, t)) for b, t in _PROBES]
        first, second = runs
        if [e[:2] for e in first] != [e[:2] for e in second]:
            raise ValueError("the model calls its modules in a different order for different inputs")
        events = tuple((path, kind, _fit(a, b)) for (path, kind, a), (_, _, b) in zip(first, second, strict=True))
        return cls(events=events)

    def to_dict(self) -> dict[str, Any]:
        """JSON-able form, sent to clients and to the server's web tier: ``{"events": [[path, kind, struct]]}``."""
        return {"version": 1, "events": [[path, kind, _struct_to_json(s)] for path, kind, s in self.events]}

    @classmethod
    def from_dict(cls, data: Any) -> ShapeTemplate:
        """Inverse of ``to_dict``. Container types resolve only to tuple/list/dict or a ModelOutput class of
        ``transformers.modeling_outputs`` (anything else becomes a dict): nothing is imported by name."""
        if not isinstance(data, dict) or data.get("version") != 1 or not isinstance(data.get("events"), list):
            raise ValueError("not a shape template (expected {'version': 1, 'events': [...]})")
        events = []
        for item in data["events"]:
            if not (isinstance(item, list) and len(item) == 3 and isinstance(item[0], str) and
                    item[1] in ("input", "output")):
                raise ValueError(f"malformed template event {str(item)[:80]!r}")
            events.append((item[0], item[1], _struct_from_json(item[2], 0)))
        return cls(events=tuple(events))

    def output_lengths(self) -> dict[str, int | None]:
        """len() of each module's output where it is a tuple/list (first call of that module), else None."""
        lengths: dict[str, int | None] = {}
        for path, kind, struct in self.events:
            if kind == "output" and path not in lengths:
                lengths[path] = len(struct[2]) if struct is not None and struct[0] == "seq" else None
        return lengths


def meta_copy(module: nn.Module) -> nn.Module:
    """The same modules with every parameter and buffer on the meta device (no weight data copied)."""
    memo: dict[int, Any] = {}
    for tensor in itertools.chain(module.parameters(), module.buffers()):
        meta = torch.empty_like(tensor, device="meta")
        memo[id(tensor)] = nn.Parameter(meta, requires_grad=tensor.requires_grad) \
            if isinstance(tensor, nn.Parameter) else meta
    return copy.deepcopy(module, memo)


def dry_run(graph: Graph, template: ShapeTemplate, meta_model: nn.Module, batch: int, seq: int,
            rows: list[slice | None] | None = None) -> dict[int, Any]:
    """Run the graph's nodes on meta tensors; return {node id: meta value} for every node that ran.

    Raises ValidationError('shape', node, source) when a node's operation fails on these shapes,
    and when a replacement's shape differs from what the model produces there.
    """
    executor = MeasuringExecutor(graph, meta_model, [None] * len(graph.invokes), batch)
    executor.ctx.protect_weights = False
    executor.ctx.deadline = time.monotonic() + USER_FUNCTION_SECONDS
    executor.rows = rows if rows is not None else _rows(graph, batch)
    seen: dict[int, Any] = {}
    try:
        # the meta device is the default: factories (graph nodes or inside sc.apply) allocate nothing real
        with torch.no_grad(), torch.device("meta"):
            executor.begin_step()
            executor.start()
            for path, kind, struct in template.events:
                if not executor.wants(path, kind):
                    continue
                value = _build(struct, batch, seq)
                if value is None:
                    continue
                fired = executor.fire(path, kind, ((value,), {}) if kind == "input" else value)
                if kind == "output":
                    _check_same_shape(value, fired, path)
    except StopForward:
        pass
    except ValidationError:
        raise
    except Exception as err:
        source = getattr(err, "source", "")
        raise ValidationError("shape", f"dry run on shapes (batch {batch}, {seq} tokens) failed: "
                              f"{getattr(err, 'message', err)}", source=source) from None
    seen.update(executor.values)
    seen.update(executor.results)
    seen[EXTRA_BYTES] = executor.allocated
    return seen


EXTRA_BYTES = -1   # key of dry_run's result holding the bytes the graph's own computations allocate


class MeasuringExecutor(Executor):
    """An executor that adds up the bytes of every value the graph computes (an upper bound on the
    extra activation memory a job needs beyond the model's own forward)."""

    allocated = 0

    def _execute(self, node: Any, args: Any, kwargs: Any, rows: Any) -> Any:
        if node.op == "call_method" and node.target == "backward":
            return None   # gradients have the shapes of their activations; nothing to learn by running it
        value = super()._execute(node, _on_meta(args), _on_meta(kwargs), rows)
        if node.op in ("call_function", "call_method", "call_module", "apply"):
            self.allocated += nbytes(value)
        return value


def _on_meta(value: Any) -> Any:
    """Literal tensors from the request join meta tensors on the meta device."""
    if isinstance(value, torch.Tensor):
        return value if value.device.type == "meta" else value.to("meta")
    kind = type(value)   # exact types only: model outputs (dict subclasses) are already on meta
    if kind is tuple:
        return tuple(_on_meta(v) for v in value)
    if kind is list:
        return [_on_meta(v) for v in value]
    if kind is dict:
        return {k: _on_meta(v) for k, v in value.items()}
    return value


def nbytes(value: Any) -> int:
    """Bytes of the tensors in a (nested) value."""
    if isinstance(value, torch.Tensor):
        return value.numel() * value.element_size()
    if isinstance(value, (list, tuple)):
        return sum(nbytes(v) for v in value)
    if isinstance(value, Mapping):
        return sum(nbytes(v) for v in value.values())
    return 0


def _rows(graph: Graph, batch: int) -> list[slice | None]:
    if len(graph.invokes) <= 1:
        return [None]
    share = max(batch // len(graph.invokes), 1)
    return [slice(i * share, (i + 1) * share) for i in range(len(graph.invokes))]


def _check_same_shape(before: Any, after: Any, path: str) -> None:
    if isinstance(before, torch.Tensor) and isinstance(after, torch.Tensor) and before.shape != after.shape:
        raise ValidationError("shape", f"the replacement for {path!r} has shape {tuple(after.shape)}, but the model "
                              f"produces {tuple(before.shape)} there")


def _record(module: nn.Module, batch: dict[str, Any]) -> list[tuple[str, str, Struct]]:
    events: list[tuple[str, str, Struct]] = []
    handles = []
    for path, sub in module.named_modules():
        def pre(m: nn.Module, args: tuple[Any, ...], path: str = path) -> None:
            events.append((path, "input", _struct(args[0]) if args else None))

        def post(m: nn.Module, args: Any, out: Any, path: str = path) -> None:
            events.append((path, "output", _struct(out)))
        handles.append(sub.register_forward_pre_hook(pre))
        handles.append(sub.register_forward_hook(post))
    try:
        with torch.no_grad():
            module(**batch)
    finally:
        for handle in handles:
            handle.remove()
    return events


def _struct(value: Any) -> Struct:
    if isinstance(value, torch.Tensor):
        return ("tensor", tuple(value.shape), value.dtype)
    if isinstance(value, (tuple, list)) and not hasattr(value, "_fields"):
        return ("seq", type(value), [_struct(v) for v in value])
    if isinstance(value, Mapping):
        return ("map", type(value), {k: _struct(v) for k, v in value.items()})
    return None


def _type_name(kind: type) -> str:
    if kind in (tuple, list, dict):
        return kind.__name__
    return f"{kind.__module__}.{kind.__qualname__}"


def _type_from_name(name: Any) -> type:
    simple = {"tuple": tuple, "list": list, "dict": dict}
    if name in simple:
        return simple[name]
    prefix = "transformers.modeling_outputs."
    if isinstance(name, str) and name.startswith(prefix) and name[len(prefix):].isidentifier():
        try:
            from transformers import modeling_outputs
            from transformers.utils import ModelOutput
        except ImportError:
            return dict
        found = getattr(modeling_outputs, name[len(prefix):], None)
        if isinstance(found, type) and issubclass(found, ModelOutput):
            return found
    return dict


def _struct_to_json(struct: Struct) -> Any:
    if struct is None:
        return None
    if struct[0] == "tensor":
        return ["tensor", list(struct[1]), str(struct[2]).removeprefix("torch.")]
    if struct[0] == "seq":
        return ["seq", _type_name(struct[1]), [_struct_to_json(s) for s in struct[2]]]
    return ["map", _type_name(struct[1]), {str(k): _struct_to_json(v) for k, v in struct[2].items()}]


def _struct_from_json(data: Any, depth: int) -> Struct:
    if data is None:
        return None
    if depth > 32 or not isinstance(data, list) or len(data) != 3:
        raise ValueError("malformed template structure")
    tag, kind, body = data
    if tag == "tensor":   # ["tensor", dims, dtype name]
        dims, dtype = kind, getattr(torch, body, None) if isinstance(body, str) else None
        if not isinstance(dtype, torch.dtype) or not isinstance(dims, list) or \
                not all((type(d) is int and d >= 0) or d in ("B", "T", "?") for d in dims):
            raise ValueError("malformed template tensor")
        return ("tensor", tuple(dims), dtype)
    if tag == "seq" and isinstance(body, list):
        return ("seq", list if kind == "list" else tuple, [_struct_from_json(s, depth + 1) for s in body])
    if tag == "map" and isinstance(body, dict):
        return ("map", _type_from_name(kind), {k: _struct_from_json(v, depth + 1) for k, v in body.items()})
    raise ValueError("malformed template structure")


def _fit(a: Struct, b: Struct) -> Struct:
    """Combine the same event seen at the two probes into dimension rules."""
    if a is None or b is None or a[0] != b[0]:
        return None
    if a[0] == "tensor":
        if len(a[1]) != len(b[1]) or a[2] != b[2]:
            return None
        return ("tensor", tuple(_dim(x, y) for x, y in zip(a[1], b[1], strict=True)), a[2])
    if a[0] == "seq":
        if len(a[2]) != len(b[2]):
            return None
        return ("seq", a[1], [_fit(x, y) for x, y in zip(a[2], b[2], strict=True)])
    keys = a[2].keys() & b[2].keys()
    return ("map", a[1], {k: _fit(a[2][k], b[2][k]) for k in a[2] if k in keys})


def _dim(x: int, y: int) -> Dim:
    (b1, t1), (b2, t2) = _PROBES
    if x == y:
        return x
    if (x, y) == (b1, b2):
        return "B"
    if (x, y) == (t1, t2):
        return "T"
    return "?"


def _build(struct: Struct, batch: int, seq: int) -> Any:
    if struct is None:
        return None
    if struct[0] == "tensor":
        dims = [batch if d == "B" else seq if d == "T" else d for d in struct[1]]
        if any(d == "?" for d in dims):
            return None
        return torch.empty(dims, dtype=struct[2], device="meta")
    if struct[0] == "seq":
        parts = [_build(s, batch, seq) for s in struct[2]]
        return parts if struct[1] is list else tuple(parts)
    fields = {k: _build(v, batch, seq) for k, v in struct[2].items()}
    try:
        return struct[1](**fields)
    except TypeError:
        return fields
