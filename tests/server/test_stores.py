"""sandbox_server.stores: the configured store, and how its URLs reach the Job view."""
from __future__ import annotations

import time
from pathlib import Path
from urllib.parse import parse_qs, urlparse

import pytest

from sandbox_server.app import create_app
from sandbox_server.config import StoreConfig
from sandbox_server.stores import open_store
from sandbox_server.submission import job_view
from sandbox_server.types import JobRecord, JobStatus, ResultInfo
from storage import LocalStore

from .conftest import make_config, services

S3 = StoreConfig(kind="s3", bucket="results-bucket", endpoint_url="http://127.0.0.1:9", access_key="AK",
                 secret_key="SK", prefix="sandbox", url_expires_s=600)


def test_local_store_by_default(tmp_path: Path) -> None:
    store = open_store(make_config(tmp_path))
    assert isinstance(store, LocalStore) and store.root == tmp_path / "results"
    assert store.url("results/abc", 900) is None
    custom = open_store(make_config(tmp_path, store=StoreConfig(path=str(tmp_path / "elsewhere"))))
    assert isinstance(custom, LocalStore) and custom.root == tmp_path / "elsewhere"


def test_s3_store_presigned_url_in_the_job_view(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("AWS_PROFILE", raising=False)
    config = make_config(tmp_path, store=S3)
    app = create_app(config)
    s = services(app)
    assert type(s.store).__name__ == "S3Store"
    result = ResultInfo(key="results/abc", sha256="0" * 64, signature="c2ln", size=3, expires=time.time() + 60)
    job = JobRecord(id="job_x", key_id="k", model="tiny-gpt2", kind="trace", status=JobStatus.COMPLETED,
                    created=1.0, started=2.0, finished=3.0, result=result)
    view = job_view(job, s.db, s.store, config)
    url = urlparse(view["result"]["url"])
    assert (url.scheme, url.netloc, url.path) == ("http", "127.0.0.1:9", "/results-bucket/sandbox/results/abc")
    assert parse_qs(url.query)["X-Amz-Expires"] == ["600"]
    assert view["position"] is None and view["result"]["sha256"] == "0" * 64


def test_s3_needs_both_credentials_or_neither(tmp_path: Path) -> None:
    from storage import StorageError

    with pytest.raises(StorageError):
        open_store(make_config(tmp_path, store=StoreConfig(kind="s3", bucket="b", access_key="only-one")))
