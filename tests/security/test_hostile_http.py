"""Every hostile-corpus case sent over HTTP to a real server (gunicorn + model workers): each gets a
4xx JSON error, never a 500, and (where the server's limits equal the corpus's) the validator's own code.

    POST /v1/jobs {"model": "tiny-llama", "graph": <hostile text>}  ->  400 {"error": {"code": "dunder", ...}}

The server serves models shaped like the corpus's bases (2 layers, width 32), so module paths and
parameter names match what the cases attack.
"""
from __future__ import annotations

import json
from collections.abc import Iterator
from typing import Any

import pytest
import requests
from hostile_cases import CASES
from hostile_graphs import Base, Case, Doc, record_bases
from serverproc import TINY_CONFIGS, start_server

pytestmark = pytest.mark.slow

SMALL = {"llama": {"num_hidden_layers": 2, "hidden_size": 32, "intermediate_size": 64},
         "gpt2": {"n_layer": 2, "n_embd": 32}}


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[str, str]]:
    models = [{"name": f"tiny-{arch}", "source": "random", "config": {**TINY_CONFIGS[arch], **small}, "seed": 0,
               "tokenizer": "gpt2-bpe"} for arch, small in SMALL.items()]
    with start_server(tmp_path_factory.mktemp("hostile-http"), models=models) as running:
        yield running.url, running.create_key("attacker")


@pytest.fixture(scope="module")
def bases() -> dict[str, Base]:
    return record_bases()


def body_of(case: Case, bases: dict[str, Base]) -> tuple[bytes, bool]:
    """The POST body for a case, and whether the graph travels as the exact text the validator would see."""
    base = bases[case.base]
    built = case.attack(Doc(base.text))
    graph: Any = built.text() if isinstance(built, Doc) else built
    exact = isinstance(graph, str)
    if isinstance(graph, bytes):   # raw bytes (e.g. not UTF-8) go into the body as they are
        return b'{"model": "' + base.spec.name.encode() + b'", "graph": "' + graph + b'"}', False
    try:
        return json.dumps({"model": base.spec.name, "graph": graph}).encode(), exact
    except (TypeError, ValueError):   # not JSON-able at all: send its repr, still hostile text
        return json.dumps({"model": base.spec.name, "graph": repr(graph)}).encode(), False


@pytest.mark.parametrize("case", CASES, ids=[c.id for c in CASES])
def test_hostile_case_over_http_is_a_4xx_json_error(case: Case, bases: dict[str, Base],
                                                     server: tuple[str, str]) -> None:
    url, key = server
    body, exact = body_of(case, bases)
    reply = requests.post(f"{url}/v1/jobs", data=body, timeout=60,
                          headers={"Authorization": f"Bearer {key}", "Content-Type": "application/json"})
    if case.limits is not None:
        # the case attacks a tighter limit than this server's defaults: here it only must not break anything
        assert reply.status_code < 500 and reply.json(), f"{case.id}: HTTP {reply.status_code}: {reply.text[:300]}"
        return
    assert 400 <= reply.status_code < 500, f"{case.id}: HTTP {reply.status_code}: {reply.text[:300]}"
    error = reply.json()["error"]
    assert error["code"] and error["message"]
    if exact and not case.big:
        assert error["code"] == case.code, f"{case.id}: {error}"


def test_server_still_serves_after_the_corpus(server: tuple[str, str]) -> None:
    url, key = server
    health = requests.get(f"{url}/healthz", timeout=10).json()
    assert set(health["models"].values()) == {"ready"}


def test_malformed_requests_over_http(server: tuple[str, str]) -> None:
    """Through gunicorn, not just the Flask test client: every answer is a JSON error with the right status."""
    url, key = server
    auth = {"Authorization": f"Bearer {key}"}
    cases = [
        (requests.post(f"{url}/v1/jobs", data=b"{not json", headers=auth, timeout=30), 400, "invalid_json"),
        (requests.post(f"{url}/v1/jobs", data=b"x" * (17 * 2**20), headers=auth, timeout=60), 413,
         "request_too_large"),
        (requests.post(f"{url}/v1/jobs", data=b"{}", timeout=30), 401, "unauthorized"),
        (requests.post(f"{url}/v1/jobs", data=b"{}", headers={"Authorization": "Bearer isk_0000000000_" + "a" * 43},
                       timeout=30), 401, "unauthorized"),
        (requests.get(f"{url}/v1/jobs/job_doesnotexist", headers=auth, timeout=30), 404, "job_not_found"),
        (requests.put(f"{url}/v1/jobs", headers=auth, timeout=30), 405, "method_not_allowed"),
        (requests.get(f"{url}/nowhere", timeout=30), 404, "not_found"),
    ]
    for reply, status, code in cases:
        assert reply.status_code == status, reply.text[:300]
        assert reply.json()["error"]["code"] == code
