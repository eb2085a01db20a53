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

import time
from typing import Any

import pytest
from hostile_cases import BY_ID, CASES
from hostile_graphs import SOURCE, Base, Case, Doc, record_bases

from validator import Limits, ModelSpec, ValidationError, validate


@pytest.fixture(scope="module")
def bases() -> dict[str, Base]:
    return record_bases()


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
