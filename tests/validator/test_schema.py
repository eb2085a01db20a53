"""validator/schema.py: the generated JSON Schema, the copy in docs/graph-format.md, and real graphs.

The schema is checked against graphs recorded by sandbox_client on a tiny model (the format's own
writer is the reference), against hand-broken documents, and against the decoder's tag and op lists.
"""
from __future__ import annotations

import copy
import json
import re
from pathlib import Path
from typing import Any

import pytest
from graph_corpus import recorded_graphs

from sandbox_client.graph import DTYPES, FORMAT_VERSION, OPS, Graph
from sandbox_client.graph.values import VALUE_TAGS
from validator.schema import graph_json_schema

DOC = Path(__file__).resolve().parents[2] / "docs" / "graph-format.md"


def between(text: str, name: str) -> str:
    found = re.search(rf"<!-- {name}:begin -->\n```json\n(.*?)\n```\n<!-- {name}:end -->", text, re.S)
    assert found, f"docs/graph-format.md has no ```json block between the {name} markers"
    return found.group(1)


@pytest.fixture(scope="module")
def validator() -> Any:
    """A draft 2020-12 validator of the schema; tests that use it skip where jsonschema is missing."""
    jsonschema = pytest.importorskip("jsonschema")
    schema = graph_json_schema()
    jsonschema.Draft202012Validator.check_schema(schema)
    return jsonschema.Draft202012Validator(schema)


def errors(validator: Any, doc: Any) -> list[str]:
    return [e.message for e in validator.iter_errors(doc)]


# ---- the documentation cannot drift -------------------------------------------------------------

def test_doc_schema_block_equals_generated_schema() -> None:
    block = between(DOC.read_text(encoding="utf-8"), "schema")
    assert json.loads(block) == graph_json_schema(), "run .venv/bin/python scripts/gen_schema_doc.py"
    assert block == json.dumps(graph_json_schema(), indent=2), "run .venv/bin/python scripts/gen_schema_doc.py"


def test_every_op_is_documented() -> None:
    doc = DOC.read_text(encoding="utf-8")
    table_ops = set(re.findall(r"^\| `(\w+)` \|", doc, re.M))
    assert set(OPS) <= table_ops, f"ops missing from docs/graph-format.md: {sorted(set(OPS) - table_ops)}"


def test_every_value_tag_and_dtype_is_documented() -> None:
    doc = DOC.read_text(encoding="utf-8").split("<!-- schema:begin -->")[0]
    for tag in VALUE_TAGS:
        assert f"| `{tag}` |" in doc, tag
    for name in DTYPES:
        assert f"`{name}`" in doc, name


def test_doc_example_graph_is_valid(validator: Any) -> None:
    text = between(DOC.read_text(encoding="utf-8"), "example")
    assert errors(validator, json.loads(text)) == []
    assert Graph.from_json(text).to_json() == text


# ---- the schema is generated from the code ---------------------------------------------------------

def test_schema_names_what_the_decoder_knows() -> None:
    schema = graph_json_schema()
    defs = schema["$defs"]
    assert schema["properties"]["version"] == {"const": FORMAT_VERSION}
    assert defs["node"]["properties"]["op"]["enum"] == list(OPS)
    assert defs["tag_dtype"]["properties"]["$dtype"]["enum"] == list(DTYPES)
    tagged = {tag for d in defs.values() for tag in d.get("properties", {}) if tag.startswith("$")}
    assert tagged == set(VALUE_TAGS)


def test_schema_is_deterministic_and_json() -> None:
    assert json.dumps(graph_json_schema()) == json.dumps(graph_json_schema())
    assert json.loads(json.dumps(graph_json_schema())) == graph_json_schema()


# ---- real graphs fit; broken ones do not ------------------------------------------------------------

@pytest.mark.parametrize("name", sorted(recorded_graphs()[0]))
def test_recorded_graphs_fit_the_schema(name: str, validator: Any) -> None:
    text = recorded_graphs()[0][name]
    assert errors(validator, json.loads(text)) == []


def test_recorded_graphs_use_every_op_and_tag() -> None:
    texts = "".join(recorded_graphs()[0].values())
    assert set(re.findall(r'"op":"(\w+)"', texts)) == set(OPS)
    assert set(re.findall(r'\{"(\$\w+)":', texts)) == set(VALUE_TAGS)


BREAKS = {
    "extra_top_field": lambda d: d.update(extra=1),
    "missing_nodes": lambda d: d.pop("nodes"),
    "wrong_version": lambda d: d.update(version=FORMAT_VERSION + 1),
    "wrong_kind": lambda d: d.update(kind="train"),
    "unknown_op": lambda d: d["nodes"][0].update(op="exec"),
    "extra_node_field": lambda d: d["nodes"][0].update(code="print(1)"),
    "missing_node_field": lambda d: d["nodes"][0].pop("source"),
    "string_id": lambda d: d["nodes"][0].update(id="0"),
    "negative_ref": lambda d: d["nodes"][1].update(args=[{"$ref": -1}]),
    "string_ref": lambda d: d["nodes"][1].update(args=[{"$ref": "0"}]),
    "unknown_tag": lambda d: d["nodes"][1].update(args=[{"$pickle": "gASVAAAAAAAAAAA="}]),
    "plain_object_value": lambda d: d["nodes"][1].update(args=[{"a": 1}]),
    "two_key_tag": lambda d: d["nodes"][1].update(args=[{"$ref": 0, "$tuple": []}]),
    "bad_dtype": lambda d: d["nodes"][1].update(args=[{"$dtype": "float128"}]),
    "bad_float": lambda d: d["nodes"][1].update(args=[{"$float": "1e999"}]),
    "short_slice": lambda d: d["nodes"][1].update(args=[{"$slice": [1, 2]}]),
    "ellipsis_false": lambda d: d["nodes"][1].update(args=[{"$ellipsis": False}]),
    "tensor_not_base64": lambda d: d["nodes"][1].update(args=[{"$tensor": "not base64!"}]),
    "kwargs_object": lambda d: d["nodes"][1].update(kwargs={"dim": 1}),
    "kwargs_int_key": lambda d: d["nodes"][1].update(kwargs=[[1, 2]]),
    "step_word": lambda d: d["nodes"][0].update(step="every"),
    "invoke_extra_field": lambda d: d["invokes"][0].update(shell="rm -rf /"),
    "long_device": lambda d: d["nodes"][1].update(args=[{"$device": "cuda:" + "0" * 40}]),
}


@pytest.mark.parametrize("name", sorted(BREAKS))
def test_broken_documents_do_not_fit(name: str, validator: Any) -> None:
    doc = json.loads(recorded_graphs()[0]["earlier_value"])
    assert errors(validator, doc) == []
    broken = copy.deepcopy(doc)
    BREAKS[name](broken)
    assert errors(validator, broken), f"the schema accepts a graph broken by {name}"
    with pytest.raises(ValueError):   # the decoder refuses the same document (GraphFormatError)
        Graph.from_json(json.dumps(broken))
