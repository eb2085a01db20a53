"""Fixtures for the web tier: an app on a temporary data folder with a tiny GPT-2's info published.

    def test_x(client, key):                    # a Flask test client and a fresh unlimited key
        client.post("/v1/jobs", json={...}, headers=key.headers)

No model worker runs: jobs stay QUEUED unless a test ends them through the database
(``finish_with_result``), as a worker would.
"""
from __future__ import annotations

import hashlib
import secrets
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import torch
from conftest import build_tiny
from flask import Flask
from flask.testing import FlaskClient

import sandbox_client as sc
from sandbox_server.app import Services, create_app
from sandbox_server.config import TINY_GPT2_CONFIG, ModelConfig, ServerConfig
from sandbox_server.keys import create_key
from sandbox_server.modelinfo import write_model_info
from sandbox_server.types import KeyRecord, ResultInfo
from storage import Signer, encode_results, result_message

TINY = ModelConfig(name="tiny-gpt2", source="random", config=dict(TINY_GPT2_CONFIG), tokenizer="gpt2-bpe",
                   description="4-layer GPT-2 with random weights")
UNPUBLISHED = ModelConfig(name="sleepy", source="random", config=dict(TINY_GPT2_CONFIG),
                          description="a model whose worker never publishes (always loading)")
IDS = torch.tensor([[3, 14, 15, 92, 65, 35]])


@dataclass
class Key:
    record: KeyRecord
    plaintext: str

    @property
    def headers(self) -> dict[str, str]:
        return {"Authorization": f"Bearer {self.plaintext}"}


def make_config(data_dir: Path, **overrides: Any) -> ServerConfig:
    return ServerConfig(data_dir=data_dir, models=(TINY, UNPUBLISHED), **overrides)


def publish_tiny(data_dir: Path, tokenizer: Any, **model_overrides: Any) -> None:
    """What the tiny-gpt2 worker publishes once loaded (build_tiny("gpt2") is TINY_GPT2_CONFIG, seed 0)."""
    cfg = ModelConfig(**{**TINY.__dict__, **model_overrides})
    write_model_info(data_dir / "models" / "tiny-gpt2", cfg, build_tiny("gpt2"), tokenizer)


def services(app: Flask) -> Services:
    found: Services = app.extensions["sandbox"]
    return found


def new_key(app: Flask, name: str | None = None, **limits: Any) -> Key:
    record, plaintext = create_key(services(app).db, name or f"user-{secrets.token_hex(4)}", **limits)
    return Key(record, plaintext)


def finish_with_result(app: Flask, job_id: str, values: dict[str, Any]) -> bytes:
    """End ``job_id`` COMPLETED as a worker does: bundle in the store, signed, recorded in the database."""
    s = services(app)
    data = encode_results(values)
    digest = hashlib.sha256(data).hexdigest()
    key = "results/" + secrets.token_urlsafe(32)
    s.store.put(key, data)
    signature = Signer.load_or_create(s.config.signing_key_path).sign(result_message(job_id, digest))
    info = ResultInfo(key=key, sha256=digest, signature=signature, size=len(data), expires=9e9)
    assert s.db.finish_job(job_id, "COMPLETED", result=info)
    return data


@pytest.fixture(scope="session")
def published(tmp_path_factory: pytest.TempPathFactory, gpt2_tokenizer: Any) -> Path:
    """A data folder with tiny-gpt2's info published (shared by the session's app)."""
    data_dir = tmp_path_factory.mktemp("web-data")
    publish_tiny(data_dir, gpt2_tokenizer)
    return data_dir


@pytest.fixture(scope="session")
def app(published: Path) -> Flask:
    """One app for the session: tests isolate through fresh keys (limits and jobs are per key)."""
    return create_app(make_config(published))


@pytest.fixture
def client(app: Flask) -> FlaskClient:
    return app.test_client()


@pytest.fixture
def key(app: Flask) -> Key:
    return new_key(app)


@pytest.fixture(scope="session")
def local_lm(gpt2_tokenizer: Any) -> sc.LanguageModel:
    """The same tiny GPT-2 as the published one, run locally to record graphs (and as a reference)."""
    return sc.LanguageModel(build_tiny("gpt2"), tokenizer=gpt2_tokenizer)


@pytest.fixture(scope="session")
def logits_graph(local_lm: sc.LanguageModel) -> str:
    """A small trace: the last position's logits on six token ids."""
    with local_lm.trace(IDS) as tracer:
        local_lm.lm_head.output[:, -1].save()
    return tracer.graph.to_json()
