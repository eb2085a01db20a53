"""sandbox_server.app: the routes other than jobs (models, tokenizer, public key, health) and JSON errors."""
from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
from flask import Flask
from flask.testing import FlaskClient

from sandbox_client.interpreter import ShapeTemplate
from sandbox_server.app import create_app
from sandbox_server.modelinfo import read_model_info
from storage import Signer
from validator import ModelSpec

from .conftest import Key, make_config, new_key, services


def test_models_lists_only_the_keys_models(app: Flask, client: FlaskClient, key: Key) -> None:
    r = client.get("/v1/models", headers=key.headers)
    assert r.status_code == 200
    models = {m["name"]: m for m in r.get_json()["models"]}
    assert list(models) == ["tiny-gpt2", "sleepy"]
    tiny = models["tiny-gpt2"]
    assert tiny == {"name": "tiny-gpt2", "status": "ready", "kind": "language_model", "dtype": "float32",
                    "device": "cpu", "description": "4-layer GPT-2 with random weights", "tokenizer": True}
    assert models["sleepy"]["status"] == "loading" and "spec" not in models["sleepy"]
    limited = new_key(app, models=["sleepy"])
    assert [m["name"] for m in client.get("/v1/models", headers=limited.headers).get_json()["models"]] == ["sleepy"]


def test_model_info_has_spec_and_template(client: FlaskClient, key: Key, published: Path) -> None:
    r = client.get("/v1/models/tiny-gpt2", headers=key.headers)
    assert r.status_code == 200
    info = r.get_json()
    reference = read_model_info(published / "models" / "tiny-gpt2", "tiny-gpt2")
    assert reference is not None
    assert ModelSpec.from_dict(info["spec"]) == reference.spec
    assert ShapeTemplate.from_dict(info["template"]) == reference.template
    assert info["status"] == "ready" and info["name"] == "tiny-gpt2"


def test_model_route_errors(app: Flask, client: FlaskClient, key: Key) -> None:
    assert client.get("/v1/models/nope", headers=key.headers).get_json()["error"]["code"] == "model_not_found"
    r = client.get("/v1/models/sleepy", headers=key.headers)
    assert (r.status_code, r.get_json()["error"]["code"]) == (503, "model_unavailable")
    limited = new_key(app, models=["sleepy"])
    for path in ("/v1/models/tiny-gpt2", "/v1/models/tiny-gpt2/tokenizer"):
        r = client.get(path, headers=limited.headers)
        assert (r.status_code, r.get_json()["error"]["code"]) == (403, "model_forbidden")
    assert client.get("/v1/models").status_code == 401


def test_tokenizer_files_rebuild_the_tokenizer(client: FlaskClient, key: Key, gpt2_tokenizer: Any,
                                               tmp_path: Path) -> None:
    from transformers import AutoTokenizer

    files = client.get("/v1/models/tiny-gpt2/tokenizer", headers=key.headers).get_json()["files"]
    assert "tokenizer.json" in files and all(isinstance(v, str) for v in files.values())
    for name, text in files.items():
        (tmp_path / name).write_text(text)
    rebuilt = AutoTokenizer.from_pretrained(str(tmp_path))
    text = "The Eiffel Tower is in the city of"
    assert rebuilt(text)["input_ids"] == gpt2_tokenizer(text)["input_ids"]
    r = client.get("/v1/models/sleepy/tokenizer", headers=key.headers)
    assert r.status_code == 503


def test_public_key_needs_no_auth_and_matches_the_signing_key(app: Flask, client: FlaskClient) -> None:
    r = client.get("/v1/public-key")
    assert r.status_code == 200
    signer = Signer.load_or_create(services(app).config.signing_key_path)
    assert r.get_json() == {"algorithm": "ed25519", "public_key": signer.public_key_b64,
                            "fingerprint": signer.fingerprint}


def test_healthz_reports_each_model(app: Flask, client: FlaskClient) -> None:
    body = client.get("/healthz").get_json()
    assert body["status"] == "ok"
    assert body["models"] == {"tiny-gpt2": "ready", "sleepy": "loading"}
    assert body["workers"]["tiny-gpt2"]["info_ready"] is True and body["workers"]["sleepy"]["info_ready"] is False


def test_worker_states_show_in_health(published: Path, tmp_path: Path) -> None:
    app = create_app(make_config(tmp_path))      # nothing published here
    db = services(app).db
    db.set_worker("tiny-gpt2", pid=123, state="loading")
    db.set_worker("sleepy", pid=None, state="down", restarts=2)
    body = app.test_client().get("/healthz").get_json()
    assert body["models"] == {"tiny-gpt2": "loading", "sleepy": "down"}
    assert body["workers"]["sleepy"] == {"worker_state": "down", "pid": None, "restarts": 2, "info_ready": False}


@pytest.mark.parametrize("method, path, status, code", [
    ("GET", "/nope", 404, "not_found"),
    ("GET", "/v1/jobs", 405, "method_not_allowed"),
    ("PUT", "/v1/jobs/job_x", 405, "method_not_allowed"),
    ("POST", "/healthz", 405, "method_not_allowed"),
    ("GET", "/v1/models/tiny-gpt2/extra/parts", 404, "not_found"),
])
def test_http_errors_are_json(client: FlaskClient, method: str, path: str, status: int, code: str) -> None:
    r = client.open(path, method=method)
    assert r.status_code == status and r.is_json
    assert r.get_json()["error"]["code"] == code
    if status == 405:
        assert r.headers["Allow"]


def test_a_crash_is_a_json_500(tmp_path: Path) -> None:
    app = create_app(make_config(tmp_path))

    @app.get("/boom")
    def boom() -> None:
        raise RuntimeError("secret detail")

    r = app.test_client().get("/boom")
    assert r.status_code == 500 and r.is_json
    error = r.get_json()["error"]
    assert error["code"] == "internal_error" and "secret detail" not in json.dumps(error)


def test_responses_are_not_cached(client: FlaskClient, key: Key) -> None:
    assert client.get("/v1/models", headers=key.headers).headers["Cache-Control"] == "no-store"
    assert client.get("/nope").headers["Cache-Control"] == "no-store"


def test_wsgi_builds_the_app_on_first_access(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    import sandbox_server.wsgi as wsgi

    monkeypatch.setattr(wsgi, "_app", None)
    monkeypatch.delenv("SANDBOX_CONFIG", raising=False)
    with pytest.raises(RuntimeError, match="SANDBOX_CONFIG"):
        wsgi.app  # noqa: B018
    config = tmp_path / "server.toml"
    config.write_text(f'[server]\ndata_dir = "{tmp_path / "data"}"\n')
    monkeypatch.setenv("SANDBOX_CONFIG", str(config))
    app = wsgi.app
    assert isinstance(app, Flask) and wsgi.app is app
    assert app.test_client().get("/healthz").get_json() == {"status": "ok", "models": {}, "workers": {}}
    assert services(app).config.db_path == tmp_path / "data" / "sandbox.db"
