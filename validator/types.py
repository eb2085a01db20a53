"""The validator's vocabulary: limits, the error it raises, and what a passed graph carries.

    try:
        checked = validate(graph_json, spec, Limits(max_nodes=500))
    except ValidationError as err:
        print(err.code, err.node, err.source, err.message)
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Annotated, Any

import pydantic
import pydantic.dataclasses

if TYPE_CHECKING:                 # Limits is read by processes that never load torch (the server's supervisor)
    from sandbox_client.graph import Graph

AtLeastOne = Annotated[int, pydantic.Field(ge=1)]
AtLeastZero = Annotated[int, pydantic.Field(ge=0)]      # 0 = none allowed


@pydantic.dataclasses.dataclass(frozen=True, config=pydantic.ConfigDict(strict=True, extra="forbid"))
class Limits:
    """Configurable bounds on one request. Defaults suit a shared CPU/GPU server.

        Limits(max_nodes=500).max_nodes                 # 500; every other bound keeps its default
        Limits(max_nodes=-5)                            # pydantic.ValidationError: greater than or equal to 1
        dataclasses.replace(limits, max_saves=10)       # a copy, checked again

    Every bound is checked when the object is built (pydantic, strict: an int, never a str or a bool):
    counts and sizes are at least 1, except the four marked 0 = none allowed. A request within a bound
    passes (``len(x) > limit`` is refused). Building one costs a few microseconds; reading a field is a
    plain attribute read.
    """

    max_nodes: AtLeastOne = 10_000
    max_request_bytes: AtLeastOne = 96 * 2**20          # the JSON text itself
    max_literal_tensor_bytes: AtLeastZero = 64 * 2**20  # all tensor literals and tensor inputs together
    max_depth: AtLeastOne = 24                          # nesting of lists/tuples/dicts inside values
    max_string_length: AtLeastOne = 20_000
    max_list_length: AtLeastOne = 100_000
    max_saves: AtLeastOne = 1_000
    max_invokes: AtLeastOne = 64
    max_batch_rows: AtLeastOne = 256
    max_tokens_per_row: AtLeastOne = 8_192
    max_new_tokens: AtLeastOne = 256
    max_factory_elements: AtLeastZero = 2**26           # torch.zeros/ones/full/arange/randn and expand/repeat
    max_source_length: AtLeastZero = 2_000              # the user's source line kept per node
    max_result_bytes: AtLeastOne = 256 * 2**20          # saved values of one job (exact with a dry run)
    max_extra_activation_bytes: AtLeastZero = 2 * 2**30  # what the graph's own ops allocate (dry-run estimate)


class ValidationError(Exception):
    """A graph was refused. ``code`` is stable for machines; ``message`` says what to do."""

    def __init__(self, code: str, message: str, *, node: int | None = None, source: str = "") -> None:
        self.code = code
        self.message = message
        self.node = node
        self.source = source
        where = f" (node {node}" + (f", {source}" if source else "") + ")" if node is not None else ""
        super().__init__(f"[{code}] {message}{where}")

    def to_dict(self) -> dict[str, Any]:
        return {"code": self.code, "message": self.message, "node": self.node, "source": self.source}


@dataclass(frozen=True)
class ValidatedGraph:
    """A graph that passed every rule, with facts the server uses to schedule it."""

    graph: Graph
    literal_tensor_bytes: int = 0
    saves: int = 0
    rows: int = 0
    result_bytes: int | None = None              # known when validated with a dry run
    notes: tuple[str, ...] = field(default_factory=tuple)
