"""The Flask app: routes of HTTP API v1 (docs/api.md). Views only parse, authorize, call the core, format.

    app = create_app(ServerConfig.load("server.toml"))      # gunicorn: sandbox_server.wsgi:app
    app.test_client().get("/healthz").json                  # {"status": "ok", "models": {...}}

Where each step lives: keys in ``auth``, job logic in ``submission``, model info and validation in
``catalog``, results in the configured store (``stores``), metrics in ``metrics``, and every error
answer in ``errors`` (JSON, never an HTML page).
"""
from __future__ import annotations

import json
import math
import secrets
import threading
from dataclasses import dataclass, field
from typing import Any

from flask import Blueprint, Flask, Response, current_app, jsonify, request
from prometheus_client import CollectorRegistry

from storage.signing import Signer, SigningKeyError
from storage.types import ResultStore

from . import submission
from .auth import authenticate
from .catalog import Catalog, model_status, model_view
from .config import ServerConfig
from .db import Database
from .errors import ApiError, register_error_handlers
from .jobends import JobEnds
from .metrics import CONTENT_TYPE, metrics_registry, render
from .stores import open_store
from .types import KeyRecord


@dataclass
class Services:
    """What the views use, built once per app (per gunicorn worker process)."""

    config: ServerConfig
    db: Database
    store: ResultStore
    catalog: Catalog
    registry: CollectorRegistry
    ends: JobEnds
    _signer: Signer | None = None
    _lock: threading.Lock = field(default_factory=threading.Lock)

    def signer(self) -> Signer:
        with self._lock:
            if self._signer is None:
                self._signer = Signer.load_or_create(self.config.signing_key_path)
            return self._signer


def create_app(config: ServerConfig, *, catalog: Catalog | None = None, warm: bool = False) -> Flask:
    """The API app over ``config``'s database, store and model folders; ``warm`` builds model copies in the
    background now instead of on each model's first job."""
    app = Flask("sandbox_server", static_folder=None)
    app.config["MAX_CONTENT_LENGTH"] = int(config.max_request_mb * 2**20)
    app.json.sort_keys = False   # type: ignore[attr-defined]  # keep the documented field order
    db = Database(config.db_path)
    catalog = catalog or Catalog(config)
    app.extensions["sandbox"] = Services(config=config, db=db, store=open_store(config), catalog=catalog,
                                         registry=metrics_registry(config, db), ends=JobEnds(config.web_socket_dir))
    register_error_handlers(app)
    app.register_blueprint(api)
    if warm:
        threading.Thread(target=catalog.warm, name="catalog-warm", daemon=True).start()
    return app


api = Blueprint("api", __name__)


# ----- jobs ----------------------------------------------------------------------------------
@api.post("/v1/jobs")
def post_job() -> tuple[Response, int, dict[str, str]]:
    s, key = _services(), _key()
    wait, inline = _wait_seconds(s.config), _inline()   # a bad parameter is refused before anything is queued
    job = submission.submit(s.config, s.db, s.catalog, key, request.get_data(cache=False))
    if wait > 0:
        job = submission.wait_for_job(s.db, job, wait, s.ends)
    view = submission.job_view(job, s.db, s.store, s.config, inline=inline)
    return _job_json(view), 202, {"Location": f"/v1/jobs/{job.id}"}


@api.get("/v1/jobs/<job_id>")
def get_job(job_id: str) -> Response:
    s, key = _services(), _key()
    job = submission.owned_job(s.db, key, job_id)
    wait, inline = _wait_seconds(s.config), _inline()
    if wait > 0:
        job = submission.wait_for_job(s.db, job, wait, s.ends)
    return _job_json(submission.job_view(job, s.db, s.store, s.config, inline=inline))


@api.get("/v1/jobs/<job_id>/result")
def get_result(job_id: str) -> Response:
    s, key = _services(), _key()
    job = submission.owned_job(s.db, key, job_id)
    data = submission.result_bytes(job, s.store)
    assert job.result is not None
    return Response(data, mimetype="application/octet-stream",
                    headers={"X-Sandbox-Sha256": job.result.sha256, "X-Sandbox-Signature": job.result.signature,
                             "Content-Disposition": f'attachment; filename="{job.id}.safetensors"'})


@api.delete("/v1/jobs/<job_id>")
def delete_job(job_id: str) -> Response:
    s, key = _services(), _key()
    job = submission.cancel_job(s.db, submission.owned_job(s.db, key, job_id), s.config)
    return jsonify(submission.job_view(job, s.db, s.store, s.config))


# ----- models --------------------------------------------------------------------------------
@api.get("/v1/models")
def list_models() -> Response:
    s, key = _services(), _key()
    names = [m.name for m in s.config.models if key.may_use(m.name)]
    return jsonify({"models": [model_view(s.catalog, n, model_status(s.db, s.catalog, n)) for n in names]})


@api.get("/v1/models/<name>")
def get_model(name: str) -> Response:
    s, key = _services(), _key()
    submission.check_model_access(s.config, key, name)
    submission.require_available(s.db, s.catalog, name)
    return jsonify(model_view(s.catalog, name, "ready", full=True))


@api.get("/v1/models/<name>/tokenizer")
def get_tokenizer(name: str) -> Response:
    s, key = _services(), _key()
    submission.check_model_access(s.config, key, name)
    info = submission.require_available(s.db, s.catalog, name)
    return jsonify({"files": info.tokenizer_files()})


# ----- server --------------------------------------------------------------------------------
@api.get("/v1/public-key")
def public_key() -> Response:
    s = _services()
    try:
        signer = s.signer()
    except (SigningKeyError, OSError) as err:
        current_app.logger.error("result signing key unusable: %s", err)
        raise ApiError(503, "signing_key_unavailable", "the server's result-signing key cannot be read; tell "
                       "the server's admin") from None
    return jsonify({"algorithm": "ed25519", "public_key": signer.public_key_b64, "fingerprint": signer.fingerprint})


@api.get("/healthz")
def healthz() -> Response:
    s = _services()
    workers = {w.model: w for w in s.db.workers()}
    models: dict[str, str] = {}
    details: dict[str, dict[str, Any]] = {}
    for m in s.config.models:
        models[m.name] = model_status(s.db, s.catalog, m.name)
        w = workers.get(m.name)
        details[m.name] = {"worker_state": w.state if w else None, "pid": w.pid if w else None,
                           "restarts": w.restarts if w else 0, "info_ready": s.catalog.info(m.name) is not None}
    return jsonify({"status": "ok", "models": models, "workers": details})


@api.get("/metrics")
def metrics() -> Response:
    return Response(render(_services().registry), content_type=CONTENT_TYPE)


@api.after_request
def _no_store(response: Response) -> Response:
    response.headers.setdefault("Cache-Control", "no-store")
    return response


# ----- request helpers -----------------------------------------------------------------------
def _services() -> Services:
    services: Services = current_app.extensions["sandbox"]
    return services


def _key() -> KeyRecord:
    return authenticate(request.headers.get("Authorization"), _services().db)


def _job_json(view: dict[str, Any]) -> Response:
    """The Job as JSON. An inline result's base64 is spliced into the text instead of passing through the
    encoder, which scans a string character by character for escapes (1 ms per 270 KB, on every long poll
    of a co-batch's users in turn); base64 has nothing to escape."""
    result = view.get("result")
    if not isinstance(result, dict) or not isinstance(result.get("data"), str):
        return jsonify(view)
    data = result["data"]
    marker = secrets.token_hex(16)           # cannot occur in the rest of the view by chance
    text = json.dumps({**view, "result": {**result, "data": marker}}, separators=(",", ":"))
    return Response(text.replace(f'"{marker}"', f'"{data}"', 1) + "\n", mimetype="application/json")


def _inline() -> bool:
    raw = request.args.get("inline", "0")
    if raw not in ("0", "1", "true", "false"):
        raise ApiError(400, "bad_request", f"inline={raw[:32]!r}: give 1 (put a small result inside the answer) "
                       "or 0")
    return raw in ("1", "true")


def _wait_seconds(config: ServerConfig) -> float:
    raw = request.args.get("wait")
    if raw is None:
        return 0.0
    try:
        wait = float(raw)
    except ValueError:
        wait = math.nan
    if not math.isfinite(wait) or wait < 0:
        raise ApiError(400, "bad_request", f"wait={raw[:32]!r}: give seconds to wait, 0 to "
                       f"{config.jobs.max_wait_s:g}")
    return min(wait, config.jobs.max_wait_s)
