"""A JSON Schema (draft 2020-12) of the graph wire format, generated from the format's own code.

    import json, jsonschema
    from validator.schema import graph_json_schema
    jsonschema.validate(json.loads(tracer.graph.to_json()), graph_json_schema())

The op names, format version, graph kinds, value tags and dtype names come from
``sandbox_client.graph`` itself, so the schema cannot name an op or tag the decoder does not
know. The schema describes the shape of a graph only; a document it accepts may still be
refused by ``validate`` (node ids out of order, references to later nodes, names off the
allowlist, sizes over the limits). ``docs/graph-format.md`` embeds the output; regenerate it
with ``.venv/bin/python scripts/gen_schema_doc.py``.
"""
from __future__ import annotations

from typing import Any

from sandbox_client.graph import DTYPES, FORMAT_VERSION, OPS
from sandbox_client.graph.nodes import KINDS
from sandbox_client.graph.values import VALUE_TAGS

SCHEMA_DIALECT = "https://json-schema.org/draft/2020-12/schema"
SCHEMA_ID = "https://interp-sandbox.invalid/schemas/graph-v{version}.json"

Schema = dict[str, Any]

_VALUE: Schema = {"$ref": "#/$defs/value"}
_PAIRS: Schema = {"$ref": "#/$defs/pairs"}
_NODE_ID: Schema = {"type": "integer", "minimum": 0}
_BASE64 = "^(?:[A-Za-z0-9+/]{4})*(?:[A-Za-z0-9+/]{2}==|[A-Za-z0-9+/]{3}=)?$"

#: value tag -> (schema of its body, description). Must name exactly the decoder's tags.
_TAG_BODIES: dict[str, tuple[Schema, str]] = {
    "$ref": (_NODE_ID, "the value of an earlier node, by id"),
    "$tuple": ({"type": "array", "items": _VALUE}, "a Python tuple"),
    "$dict": (_PAIRS, "a dict with string keys, as [key, value] pairs in order"),
    "$slice": ({"type": "array", "prefixItems": [_VALUE, _VALUE, _VALUE], "items": False, "minItems": 3},
               "slice(start, stop, step)"),
    "$ellipsis": ({"const": True}, "Python's Ellipsis (...)"),
    "$size": ({"type": "array", "items": {"type": "integer"}}, "a torch.Size"),
    "$dtype": ({"enum": list(DTYPES)}, "a torch dtype, by name"),
    "$device": ({"type": "string", "maxLength": 32}, "a torch device such as 'cpu'"),
    "$tensor": ({"type": "string", "contentEncoding": "base64", "pattern": _BASE64},
                "a tensor: base64 of safetensors bytes holding one tensor named 't'"),
    "$float": ({"enum": ["nan", "inf", "-inf"]}, "a non-finite float (JSON has no NaN or Infinity)"),
}


def graph_json_schema() -> Schema:
    """The JSON Schema of ``Graph.to_json()`` output, as a plain dict (deterministic key order)."""
    tags = set(VALUE_TAGS)
    if tags != set(_TAG_BODIES):
        raise RuntimeError(f"validator/schema.py is out of date with the graph value tags: the decoder knows "
                           f"{sorted(tags)}, the schema {sorted(_TAG_BODIES)}; describe the new tag in _TAG_BODIES")
    tag_defs = {_def_name(tag): _tagged(tag, *_TAG_BODIES[tag]) for tag in VALUE_TAGS}
    return {
        "$schema": SCHEMA_DIALECT,
        "$id": SCHEMA_ID.format(version=FORMAT_VERSION),
        "title": f"interp-sandbox intervention graph, format version {FORMAT_VERSION}",
        "description": "Graph.to_json() output. Shape only: validator.validate() applies the allowlist, "
                       "reference order and size limits on top.",
        "type": "object",
        "properties": {
            "version": {"const": FORMAT_VERSION},
            "kind": {"enum": list(KINDS)},
            "options": {**_PAIRS, "description": "keyword options of the run, e.g. max_new_tokens"},
            "invokes": {"type": "array", "items": {"$ref": "#/$defs/invoke"}},
            "nodes": {"type": "array", "items": {"$ref": "#/$defs/node"},
                      "description": "in recording order; node i has id i"},
        },
        "required": ["version", "kind", "options", "invokes", "nodes"],
        "additionalProperties": False,
        "$defs": {
            "invoke": {
                "description": "the model input of one invoke: positional and keyword arguments",
                "type": "object",
                "properties": {"args": {"type": "array", "items": _VALUE}, "kwargs": _PAIRS},
                "required": ["args", "kwargs"],
                "additionalProperties": False,
            },
            "node": _node_schema(),
            "value": {
                "description": "a literal: plain JSON scalars and arrays, or a one-key object tagged with '$'",
                "anyOf": [
                    {"type": ["null", "boolean", "number", "string"]},
                    {"type": "array", "items": _VALUE},
                    *({"$ref": f"#/$defs/{name}"} for name in tag_defs),
                ],
            },
            "pairs": {
                "description": "a dict with string keys, as a list of [key, value] pairs",
                "type": "array",
                "items": {"type": "array", "prefixItems": [{"type": "string"}, _VALUE], "items": False,
                          "minItems": 2},
            },
            **tag_defs,
        },
    }


def _node_schema() -> Schema:
    return {
        "description": "one recorded operation",
        "type": "object",
        "properties": {
            "id": _NODE_ID,
            "op": {"enum": list(OPS)},
            "target": {"type": ["string", "null"],
                       "description": "module path, function/method/attribute name, parameter name, "
                                      "or function source, depending on op"},
            "args": {"type": "array", "items": _VALUE},
            "kwargs": _PAIRS,
            "invoke": {"anyOf": [_NODE_ID, {"type": "null"}],
                       "description": "index of the invoke whose batch rows the node sees; null: the whole batch"},
            "step": {"anyOf": [{"type": "integer", "minimum": 0}, {"const": "all"}],
                     "description": "generation step the node runs at, or 'all'"},
            "after": {"type": "array", "items": _NODE_ID,
                      "description": "ids of nodes that must run first without being arguments"},
            "source": {"type": "string", "description": "the user's source line, for error messages"},
        },
        "required": ["id", "op", "target", "args", "kwargs", "invoke", "step", "after", "source"],
        "additionalProperties": False,
    }


def _tagged(tag: str, body: Schema, description: str) -> Schema:
    return {
        "description": description,
        "type": "object",
        "properties": {tag: body},
        "required": [tag],
        "additionalProperties": False,
    }


def _def_name(tag: str) -> str:
    return "tag_" + tag.removeprefix("$")
