"""storage/s3.py against a real S3 server (SeaweedFS with signature checks on, see tests/s3server.py).

References: a raw boto3 client (what is in the bucket, ETags of multipart uploads), urllib
(what a browser or the client does with a presigned URL), and the URL's own query string.
"""
from __future__ import annotations

import hashlib
import os
import secrets
import time
import urllib.error
import urllib.request
from typing import Any
from urllib.parse import parse_qs, urlsplit

import boto3
import pytest
from botocore.config import Config
from s3server import S3Server

from storage import ResultMissing, StorageError
from storage.s3 import MAX_URL_EXPIRES_S, MULTIPART_THRESHOLD, PART_SIZE, S3Store


def make_store(s3: S3Server, bucket: str | None = None, **options: Any) -> S3Store:
    settings = dict(endpoint_url=s3.endpoint_url, access_key=s3.access_key, secret_key=s3.secret_key) | options
    return S3Store(bucket or s3.bucket, **settings)


@pytest.fixture(scope="module")
def raw(s3_server: S3Server) -> Any:
    """A plain boto3 client: the independent view of the bucket."""
    return boto3.client("s3", endpoint_url=s3_server.endpoint_url, aws_access_key_id=s3_server.access_key,
                        aws_secret_access_key=s3_server.secret_key, region_name=s3_server.region,
                        config=Config(signature_version="s3v4", s3={"addressing_style": "path"}))


@pytest.fixture
def store(s3_server: S3Server) -> S3Store:
    return make_store(s3_server)


@pytest.fixture
def key() -> str:
    return "results/" + secrets.token_urlsafe(32)


def fetch(url: str) -> tuple[int, bytes]:
    try:
        with urllib.request.urlopen(url, timeout=10) as response:
            return response.status, response.read()
    except urllib.error.HTTPError as exc:
        return exc.code, exc.read()


def test_put_get_delete(store: S3Store, raw: Any, s3_server: S3Server, key: str) -> None:
    store.put(key, b"bundle bytes")
    assert raw.get_object(Bucket=s3_server.bucket, Key=key)["Body"].read() == b"bundle bytes"
    assert store.get(key) == b"bundle bytes"
    store.put(key, b"replaced")
    assert store.get(key) == b"replaced"
    store.delete(key)
    with pytest.raises(ResultMissing, match=key):
        store.get(key)
    store.delete(key)  # idempotent


def test_missing_key_is_result_missing(store: S3Store) -> None:
    with pytest.raises(ResultMissing):
        store.get("results/never-stored")


def test_prefix_is_prepended(s3_server: S3Server, raw: Any, key: str) -> None:
    store = make_store(s3_server, prefix="/tenant-a/")
    store.put(key, b"x")
    assert raw.get_object(Bucket=s3_server.bucket, Key="tenant-a/" + key)["Body"].read() == b"x"
    assert "tenant-a/" + key in urlsplit(store.url(key, 60)).path


def test_large_result_is_uploaded_in_parts(store: S3Store, raw: Any, s3_server: S3Server, key: str) -> None:
    assert PART_SIZE >= 5 * 1024 * 1024  # S3 refuses smaller parts
    data = os.urandom(12 * 1024 * 1024)
    store.put(key, data)
    head = raw.head_object(Bucket=s3_server.bucket, Key=key)
    parts = -(-len(data) // PART_SIZE)
    assert head["ETag"].strip('"').endswith(f"-{parts}")  # multipart ETags are "<md5 of md5s>-<parts>"
    assert head["ContentLength"] == len(data)
    assert hashlib.sha256(store.get(key)).digest() == hashlib.sha256(data).digest()
    store.delete(key)


def test_small_result_is_one_put(store: S3Store, raw: Any, s3_server: S3Server, key: str) -> None:
    data = b"y" * 1000
    assert len(data) < MULTIPART_THRESHOLD
    store.put(key, data)
    assert raw.head_object(Bucket=s3_server.bucket, Key=key)["ETag"].strip('"') == hashlib.md5(data).hexdigest()


def test_presigned_url_downloads_the_object(store: S3Store, key: str) -> None:
    store.put(key, b"direct download")
    url = store.url(key, 300)
    assert url.startswith(store._client.meta.endpoint_url)
    assert fetch(url) == (200, b"direct download")


def test_tampered_presigned_url_is_refused(store: S3Store, key: str) -> None:
    store.put(key, b"secret")
    url = store.url(key, 300)
    signature = parse_qs(urlsplit(url).query)["X-Amz-Signature"][0]
    flipped = signature[:-1] + ("0" if signature[-1] != "0" else "1")
    status, body = fetch(url.replace(signature, flipped))
    assert status == 403 and b"secret" not in body
    other_key = url.replace(key, key[:-1] + ("A" if key[-1] != "A" else "B"))
    assert fetch(other_key)[0] == 403


def test_expired_presigned_url_is_refused(store: S3Store, key: str) -> None:
    store.put(key, b"short-lived")
    url = store.url(key, 1)
    time.sleep(2.1)
    assert fetch(url)[0] == 403


def test_unsigned_get_is_refused(store: S3Store, key: str) -> None:
    store.put(key, b"private")
    assert fetch(store.url(key, 60).split("?")[0])[0] == 403


@pytest.mark.parametrize(("asked", "expected"), [(3600, MAX_URL_EXPIRES_S), (900, 900), (60, 60), (0, 1), (-5, 1)])
def test_url_lifetime_is_clamped_to_15_minutes(store: S3Store, asked: int, expected: int) -> None:
    assert MAX_URL_EXPIRES_S == 900
    query = parse_qs(urlsplit(store.url("results/x", asked)).query)
    assert query["X-Amz-Expires"] == [str(expected)]
    assert query["X-Amz-Algorithm"] == ["AWS4-HMAC-SHA256"]


def test_wrong_secret_is_a_storage_error_that_says_so(s3_server: S3Server, key: str) -> None:
    store = make_store(s3_server, secret_key="not-the-secret")
    for call in (lambda: store.put(key, b"x"), lambda: store.get(key),
                 lambda: store.put(key, b"z" * (MULTIPART_THRESHOLD + 1))):
        with pytest.raises(StorageError, match="SignatureDoesNotMatch.*secret") as info:
            call()
        assert not isinstance(info.value, ResultMissing)


def test_unknown_access_key_is_a_storage_error(s3_server: S3Server, key: str) -> None:
    store = make_store(s3_server, access_key="AKNOBODY", secret_key="x")
    with pytest.raises(StorageError, match="access key"):
        store.get(key)


def test_credentials_from_aws_environment(s3_server: S3Server, monkeypatch: pytest.MonkeyPatch, key: str) -> None:
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", s3_server.access_key)
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", s3_server.secret_key)
    store = S3Store(s3_server.bucket, endpoint_url=s3_server.endpoint_url)
    store.put(key, b"env")
    assert store.get(key) == b"env"


def test_half_given_credentials_are_refused(s3_server: S3Server) -> None:
    with pytest.raises(StorageError, match="both"):
        S3Store(s3_server.bucket, endpoint_url=s3_server.endpoint_url, access_key="only-this")


def test_missing_bucket_says_how_to_fix_it(s3_server: S3Server) -> None:
    store = make_store(s3_server, bucket="no-such-bucket-" + secrets.token_hex(4))
    with pytest.raises(StorageError, match="create_bucket=True"):
        store.put("results/x", b"x")


def test_create_bucket_option(s3_server: S3Server, raw: Any) -> None:
    bucket = "created-" + secrets.token_hex(4)
    store = make_store(s3_server, bucket=bucket, create_bucket=True)
    raw.head_bucket(Bucket=bucket)
    make_store(s3_server, bucket=bucket, create_bucket=True)  # already there: fine
    store.put("results/x", b"in the new bucket")
    assert raw.get_object(Bucket=bucket, Key="results/x")["Body"].read() == b"in the new bucket"


def test_unreachable_endpoint_is_a_storage_error() -> None:
    store = S3Store("bucket", endpoint_url="http://127.0.0.1:9", access_key="a", secret_key="b")
    with pytest.raises(StorageError, match="cannot reach"):
        store.get("results/x")


@pytest.mark.parametrize("bad", ["", "../x", "/abs", "a//b", "a b"])
def test_bad_keys_are_refused_without_a_request(bad: str) -> None:
    store = S3Store("bucket", endpoint_url="http://127.0.0.1:9", access_key="a", secret_key="b")
    for call in (lambda: store.put(bad, b"x"), lambda: store.get(bad), lambda: store.delete(bad),
                 lambda: store.url(bad, 10)):
        with pytest.raises(StorageError, match="key"):
            call()
