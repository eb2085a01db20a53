"""The configured result store: a local folder or an S3-compatible bucket.

    store = open_store(config)          # LocalStore(<data_dir>/results) or S3Store(bucket, ...)
    store.put(key, bundle); store.url(key, config.store.url_expires_s)

S3 credentials come from ``[store] access_key/secret_key`` when both are set, else from the
standard ``AWS_ACCESS_KEY_ID``/``AWS_SECRET_ACCESS_KEY`` environment (boto3's usual chain).
"""
from __future__ import annotations

from storage.local import LocalStore
from storage.types import ResultStore

from .config import ServerConfig


def open_store(config: ServerConfig) -> ResultStore:
    """The store ``config.store`` describes (raises storage.StorageError when it cannot be opened)."""
    s = config.store
    if s.kind == "s3":
        from storage.s3 import S3Store  # boto3 loads only for an S3 store

        return S3Store(s.bucket, endpoint_url=s.endpoint_url or None, access_key=s.access_key or None,
                       secret_key=s.secret_key or None, region=s.region, prefix=s.prefix,
                       create_bucket=s.create_bucket)
    return LocalStore(config.results_path)
