"""docs/openapi.json matches the app: the same routes, and real answers validate against the declared schemas."""
from __future__ import annotations

import dataclasses
import json
import re
from pathlib import Path
from typing import Any

import pytest
import torch
from flask import Flask
from flask.testing import FlaskClient
from jsonschema import Draft202012Validator
from werkzeug.test import TestResponse

from sandbox_server.app import create_app
from sandbox_server.types import JobError, JobStatus

from .conftest import finish_with_result, make_config, new_key, services

DOC: dict[str, Any] = json.loads((Path(__file__).resolve().parents[2] / "docs" / "openapi.json").read_text())
METHODS = {"get", "post", "put", "patch", "delete"}


def app_routes(app: Flask) -> set[tuple[str, str]]:
    routes = set()
    for rule in app.url_map.iter_rules():
        path = re.sub(r"<(?:[^:>]+:)?([^>]+)>", r"{\1}", rule.rule)
        routes |= {(path, m.lower()) for m in rule.methods or () if m.lower() in METHODS}
    return routes


def doc_routes() -> set[tuple[str, str]]:
    return {(path, m) for path, item in DOC["paths"].items() for m in item if m in METHODS}


def node_ref_parts(ref: str) -> list[str]:
    assert ref.startswith("#/"), ref
    return ref[2:].split("/")


def deref(node: Any) -> Any:
    while isinstance(node, dict) and set(node) == {"$ref"}:
        target: Any = DOC
        for part in node_ref_parts(node["$ref"]):
            target = target[part]
        node = target
    return node


def check(response: TestResponse, path: str, method: str) -> None:
    """The answer's status, headers and body are what the document declares for this operation."""
    operation = DOC["paths"][path][method]
    declared = operation["responses"].get(str(response.status_code))
    assert declared is not None, f"{method.upper()} {path} answered {response.status_code}, not declared"
    declared = deref(declared)
    for header in declared.get("headers", {}):
        if header != "WWW-Authenticate" or response.status_code == 401:
            assert header in response.headers, f"{header} missing from {method.upper()} {path}"
    content = declared["content"]
    media = response.mimetype
    assert media in content, f"{method.upper()} {path} answered {media}, declared {list(content)}"
    if media == "application/json":
        schema = {**content[media]["schema"], "components": DOC["components"]}
        errors = sorted(Draft202012Validator(schema).iter_errors(response.get_json()), key=str)
        assert not errors, f"{method.upper()} {path} {response.status_code}: {errors[0].message}"


def test_every_route_is_documented_and_every_documented_route_exists(app: Flask) -> None:
    assert app_routes(app) == doc_routes()


def test_every_reference_resolves() -> None:
    refs = re.findall(r'"\$ref": "([^"]+)"', json.dumps(DOC))
    assert refs
    for ref in set(refs):
        deref({"$ref": ref})
    for schema in DOC["components"]["schemas"].values():
        Draft202012Validator.check_schema(schema)
    for path, method in doc_routes():
        assert DOC["paths"][path][method]["responses"], (path, method)


def test_job_statuses_and_error_fields_are_the_servers() -> None:
    """The documented Job.status values are JobStatus's members, and JobError is the documented error object."""
    schemas = DOC["components"]["schemas"]
    assert schemas["Job"]["properties"]["status"]["enum"] == [s.value for s in JobStatus]
    assert schemas["JobError"]["required"] == [f.name for f in dataclasses.fields(JobError)]
    error = JobError("timeout", "the job ran too long", node=3, source="x = f(y)")
    assert not list(Draft202012Validator(schemas["JobError"]).iter_errors(error.to_dict()))
    assert JobError.from_dict(error.to_dict()) == error
    assert JobError.from_dict({"code": "c", "message": "m"}) == JobError("c", "m", None, "")


@pytest.fixture
def job_graph(logits_graph: str) -> dict[str, str]:
    return {"model": "tiny-gpt2", "graph": logits_graph}


def test_job_answers_match(app: Flask, client: FlaskClient, job_graph: dict[str, str]) -> None:
    key = new_key(app, rate=3)
    h = key.headers
    r = client.post("/v1/jobs", json=job_graph, headers=h)
    check(r, "/v1/jobs", "post")
    job_id = r.get_json()["id"]
    check(client.post("/v1/jobs", data=b"{", headers=h), "/v1/jobs", "post")
    check(client.post("/v1/jobs", json=job_graph), "/v1/jobs", "post")
    check(client.post("/v1/jobs", json={**job_graph, "model": "nope"}, headers=h), "/v1/jobs", "post")
    check(client.post("/v1/jobs", json={**job_graph, "model": "sleepy"}, headers=h), "/v1/jobs", "post")
    check(client.post("/v1/jobs", json={**job_graph, "model": "tiny-gpt2"},
                      headers=new_key(app, models=["sleepy"]).headers), "/v1/jobs", "post")
    client.post("/v1/jobs", json=job_graph, headers=h)
    client.post("/v1/jobs", json=job_graph, headers=h)
    r = client.post("/v1/jobs", json=job_graph, headers=h)
    assert r.status_code == 429
    check(r, "/v1/jobs", "post")

    path = "/v1/jobs/{job_id}"
    check(client.get(f"/v1/jobs/{job_id}", headers=h), path, "get")
    check(client.get(f"/v1/jobs/{job_id}?wait=x", headers=h), path, "get")
    check(client.get("/v1/jobs/job_nope", headers=h), path, "get")
    check(client.get(f"/v1/jobs/{job_id}/result", headers=h), path + "/result", "get")
    check(client.delete(f"/v1/jobs/{job_id}", headers=h), path, "delete")
    check(client.delete(f"/v1/jobs/{job_id}", headers=h), path, "delete")
    check(client.get(f"/v1/jobs/{job_id}/result", headers=h), path + "/result", "get")

    done_headers = new_key(app).headers
    done_id = client.post("/v1/jobs", json=job_graph, headers=done_headers).get_json()["id"]
    finish_with_result(app, done_id, {"1": torch.ones(2)})
    check(client.get(f"/v1/jobs/{done_id}", headers=done_headers), path, "get")
    inline = client.get(f"/v1/jobs/{done_id}?inline=1", headers=done_headers)
    assert "data" in inline.get_json()["result"]
    check(inline, path, "get")
    check(client.get(f"/v1/jobs/{done_id}?inline=maybe", headers=done_headers), path, "get")
    check(client.post("/v1/jobs?wait=0.01&inline=1", json=job_graph, headers=done_headers), "/v1/jobs", "post")
    check(client.post("/v1/jobs?wait=-1", json=job_graph, headers=done_headers), "/v1/jobs", "post")
    check(client.get(f"/v1/jobs/{done_id}/result", headers=done_headers), path + "/result", "get")
    services(app).db.mark_expired(done_id)
    check(client.get(f"/v1/jobs/{done_id}/result", headers=done_headers), path + "/result", "get")
    check(client.get(f"/v1/jobs/{done_id}", headers=done_headers), path, "get")


def test_model_and_server_answers_match(app: Flask, client: FlaskClient) -> None:
    key = new_key(app)
    h = key.headers
    check(client.get("/v1/models", headers=h), "/v1/models", "get")
    check(client.get("/v1/models"), "/v1/models", "get")
    check(client.get("/v1/models/tiny-gpt2", headers=h), "/v1/models/{name}", "get")
    check(client.get("/v1/models/sleepy", headers=h), "/v1/models/{name}", "get")
    check(client.get("/v1/models/nope", headers=h), "/v1/models/{name}", "get")
    check(client.get("/v1/models/tiny-gpt2/tokenizer", headers=h), "/v1/models/{name}/tokenizer", "get")
    check(client.get("/v1/public-key"), "/v1/public-key", "get")
    check(client.get("/healthz"), "/healthz", "get")
    check(client.get("/metrics"), "/metrics", "get")
    services(app).db.revoke_key(key.record.id)
    check(client.get("/v1/models", headers=h), "/v1/models", "get")


def test_too_large_answer_matches(published: Path) -> None:
    app = create_app(make_config(published, max_request_mb=0.001))
    key = new_key(app)
    r = app.test_client().post("/v1/jobs", data=b"x" * 5000, headers=key.headers)
    assert r.status_code == 413
    check(r, "/v1/jobs", "post")
