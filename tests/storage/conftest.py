"""Fixtures for the storage tests: one real SeaweedFS S3 server for the whole session.

    def test_put(s3_server: S3Server) -> None:
        store = S3Store(s3_server.bucket, endpoint_url=s3_server.endpoint_url, ...)
"""
from __future__ import annotations

from collections.abc import Iterator

import pytest
from s3server import S3Server, running_s3_server


@pytest.fixture(scope="session")
def s3_server() -> Iterator[S3Server]:
    with running_s3_server() as server:
        yield server
