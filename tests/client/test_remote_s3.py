"""sc.RemoteModel against a server whose result store is S3 (a real SeaweedFS with signature checks):
results come straight from the bucket through presigned URLs, are verified, and equal local runs.

Reference: sc.LanguageModel(conftest.build_tiny("gpt2")) running the same user code in this process.
"""
from __future__ import annotations

import os
from collections.abc import Iterator
from typing import Any
from urllib.parse import parse_qs, urlparse

import boto3
import pytest
import requests
import torch
from botocore.config import Config
from conftest import build_tiny
from s3server import running_s3_server
from serverproc import TINY_MODELS, s3_store, start_server

import sandbox_client as sc
from sandbox_client.remote.pins import CONFIG_ENV

pytestmark = pytest.mark.slow
PROMPT = "The Eiffel Tower is in the city of"
LONG = " ".join(["word"] * 60)   # 60 tokens of logits: ~12 MB, over the store's multipart threshold


@pytest.fixture(scope="module")
def s3_setup(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[Any, Any, str]]:
    previous = os.environ.get(CONFIG_ENV)
    os.environ[CONFIG_ENV] = str(tmp_path_factory.mktemp("pins"))
    try:
        with running_s3_server() as s3, start_server(tmp_path_factory.mktemp("s3-server"),
                                                     models=[TINY_MODELS["tiny-gpt2"]], store=s3_store(s3)) as server:
            yield s3, server, server.create_key("s3-tests")
    finally:
        if previous is None:
            os.environ.pop(CONFIG_ENV, None)
        else:
            os.environ[CONFIG_ENV] = previous


@pytest.fixture(scope="module")
def models(s3_setup: tuple[Any, Any, str], gpt2_tokenizer: Any) -> tuple[sc.RemoteModel, sc.LanguageModel]:
    _, server, key = s3_setup
    return (sc.RemoteModel("tiny-gpt2", host=server.url, api_key=key, verbose=False),
            sc.LanguageModel(build_tiny("gpt2"), tokenizer=gpt2_tokenizer))


def finished(remote: sc.RemoteModel, prompt: str) -> tuple[Any, Any]:
    tracer = remote.trace(prompt, blocking=False)
    with tracer:
        logits = remote.lm_head.output.save()
    tracer.job.wait(timeout=60)
    return tracer.job, logits


def test_results_come_from_the_bucket_and_equal_local(models: Any, s3_setup: Any) -> None:
    s3, _, _ = s3_setup
    remote, local = models
    job, logits = finished(remote, PROMPT)
    url = job.info["result"]["url"]
    assert url.startswith(s3.endpoint_url + "/"), url            # a presigned S3 URL, not the API server
    assert int(parse_qs(urlparse(url).query)["X-Amz-Expires"][0]) <= 900
    with local.trace(PROMPT):
        want = local.lm_head.output.save()
    assert torch.equal(logits.value, want.value)


def test_large_result_multipart_and_bitwise(models: Any) -> None:
    remote, local = models
    job, logits = finished(remote, LONG)
    assert job.info["result"]["size"] > 8 * 2**20
    with local.trace(LONG):
        want = local.lm_head.output.save()
    assert torch.equal(logits.value, want.value)


def test_tampered_or_expired_url_is_refused_by_s3(models: Any) -> None:
    remote, _ = models
    job, _ = finished(remote, PROMPT)
    url = job.info["result"]["url"]
    assert requests.get(url, timeout=10).status_code == 200
    signature = parse_qs(urlparse(url).query)["X-Amz-Signature"][0]
    forged = url.replace(signature, ("0" if signature[0] != "0" else "1") + signature[1:])
    assert requests.get(forged, timeout=10).status_code == 403
    longer = url.replace("X-Amz-Expires=", "X-Amz-Expires=9")   # a longer life than was signed
    assert requests.get(longer, timeout=10).status_code == 403


def test_tampered_object_in_the_bucket_is_refused(models: Any, s3_setup: Any) -> None:
    s3, _, _ = s3_setup
    remote, _ = models
    tracer = remote.trace(PROMPT, blocking=False)
    with tracer:
        logits = remote.lm_head.output.save()
    info = tracer.job.refresh(wait=30)
    assert info["status"] == "COMPLETED"
    key = urlparse(info["result"]["url"]).path.split("/", 2)[2]    # path-style: /<bucket>/<key>
    client = boto3.client("s3", endpoint_url=s3.endpoint_url, aws_access_key_id=s3.access_key,
                          aws_secret_access_key=s3.secret_key, region_name=s3.region,
                          config=Config(signature_version="s3v4", s3={"addressing_style": "path"}))
    data = bytearray(client.get_object(Bucket=s3.bucket, Key=key)["Body"].read())
    data[-1] ^= 0x01
    client.put_object(Bucket=s3.bucket, Key=key, Body=bytes(data))
    with pytest.raises(sc.ResultVerificationError):
        _ = logits.value
