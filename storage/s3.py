"""``S3Store``: result bundles in an S3-compatible bucket (AWS S3, MinIO, Ceph RGW, SeaweedFS).

    >>> store = S3Store("sandbox-results", endpoint_url="http://127.0.0.1:8333",
    ...                 access_key="AK", secret_key="SK", create_bucket=True)
    >>> store.put("results/abc", bundle)
    >>> store.url("results/abc", 900)        # presigned GET, the client downloads directly
    'http://127.0.0.1:8333/sandbox-results/results/abc?X-Amz-Algorithm=AWS4-HMAC-SHA256&...'

Requests are signed with SigV4 and use path-style addressing, which every S3-compatible server
understands. Credentials not passed in come from boto3's usual chain (``AWS_ACCESS_KEY_ID`` /
``AWS_SECRET_ACCESS_KEY``, ``~/.aws``, instance roles); ``AWS_ENDPOINT_URL`` works too.
Objects of ``MULTIPART_THRESHOLD`` bytes or more are uploaded in parts of ``PART_SIZE`` bytes
(S3 rejects parts under 5 MiB). Presigned URLs live at most ``MAX_URL_EXPIRES_S`` seconds: a
leaked URL stops working quickly, and results can be deleted without outstanding links.
"""
from __future__ import annotations

import io
from typing import Any

import boto3
from boto3.exceptions import Boto3Error
from boto3.s3.transfer import TransferConfig
from botocore.config import Config
from botocore.exceptions import BotoCoreError, ClientError, EndpointConnectionError, NoCredentialsError

from storage.types import ResultMissing, StorageError, check_data, check_key

MAX_URL_EXPIRES_S = 900
MULTIPART_THRESHOLD = 8 * 1024 * 1024
PART_SIZE = 8 * 1024 * 1024
_MISSING_CODES = {"NoSuchKey", "404", "NotFound"}
_HINTS = {
    "SignatureDoesNotMatch": "check the secret key (secret_key or AWS_SECRET_ACCESS_KEY)",
    "InvalidAccessKeyId": "check the access key (access_key or AWS_ACCESS_KEY_ID)",
    "AccessDenied": "give these credentials read/write access to the bucket",
    "403": "check the credentials and that they may use this bucket",
    "NoSuchBucket": "create the bucket or pass create_bucket=True",
}


class S3Store:
    """A ``ResultStore`` over ``bucket``; every key is stored as ``prefix/key``."""

    def __init__(
        self,
        bucket: str,
        endpoint_url: str | None = None,
        access_key: str | None = None,
        secret_key: str | None = None,
        region: str = "us-east-1",
        prefix: str = "",
        create_bucket: bool = False,
    ) -> None:
        if (access_key is None) != (secret_key is None):
            raise StorageError("pass both access_key and secret_key, or neither (then AWS_* variables are used)")
        if not bucket:
            raise StorageError("S3Store needs a bucket name")
        self.bucket = bucket
        self.region = region
        self.prefix = check_key(prefix.strip("/")) + "/" if prefix.strip("/") else ""
        self._client: Any = boto3.session.Session().client(
            "s3",
            endpoint_url=endpoint_url,
            aws_access_key_id=access_key,
            aws_secret_access_key=secret_key,
            region_name=region,
            config=Config(
                signature_version="s3v4",
                s3={"addressing_style": "path"},
                retries={"max_attempts": 3, "mode": "standard"},
                connect_timeout=10,
                read_timeout=60,
            ),
        )
        self._transfer = TransferConfig(
            multipart_threshold=MULTIPART_THRESHOLD, multipart_chunksize=PART_SIZE, max_concurrency=4
        )
        if create_bucket:
            self._ensure_bucket()

    def __repr__(self) -> str:
        return f"S3Store(bucket={self.bucket!r}, endpoint_url={self._client.meta.endpoint_url!r})"

    def put(self, key: str, data: bytes) -> None:
        name = self._name(key)
        check_data(data)
        try:
            if len(data) < MULTIPART_THRESHOLD:
                self._client.put_object(Bucket=self.bucket, Key=name, Body=bytes(data))
            else:
                self._client.upload_fileobj(io.BytesIO(data), self.bucket, name, Config=self._transfer)
        except (ClientError, BotoCoreError, Boto3Error) as exc:
            raise self._error("put", key, exc) from None

    def get(self, key: str) -> bytes:
        name = self._name(key)
        try:
            response = self._client.get_object(Bucket=self.bucket, Key=name)
            return bytes(response["Body"].read())
        except (ClientError, BotoCoreError, Boto3Error) as exc:
            raise self._error("get", key, exc) from None

    def delete(self, key: str) -> None:
        name = self._name(key)
        try:
            self._client.delete_object(Bucket=self.bucket, Key=name)
        except (ClientError, BotoCoreError, Boto3Error) as exc:
            error = self._error("delete", key, exc)
            if not isinstance(error, ResultMissing):
                raise error from None

    def url(self, key: str, expires_s: int) -> str:
        """A presigned GET URL for ``key``, valid ``expires_s`` seconds clamped to 1..MAX_URL_EXPIRES_S."""
        name = self._name(key)
        expires = max(1, min(int(expires_s), MAX_URL_EXPIRES_S))
        try:
            url: str = self._client.generate_presigned_url(
                "get_object", Params={"Bucket": self.bucket, "Key": name}, ExpiresIn=expires
            )
        except (ClientError, BotoCoreError, Boto3Error) as exc:
            raise self._error("presign", key, exc) from None
        return url

    def _name(self, key: str) -> str:
        return self.prefix + check_key(key)

    def _ensure_bucket(self) -> None:
        try:
            self._client.head_bucket(Bucket=self.bucket)
            return
        except ClientError as exc:
            if _code(exc) not in _MISSING_CODES | {"NoSuchBucket"}:
                raise self._error("check bucket", "", exc) from None
        except BotoCoreError as exc:
            raise self._error("check bucket", "", exc) from None
        options: dict[str, Any] = {}
        if self.region != "us-east-1":  # us-east-1 is S3's default and refuses an explicit constraint
            options["CreateBucketConfiguration"] = {"LocationConstraint": self.region}
        try:
            self._client.create_bucket(Bucket=self.bucket, **options)
        except ClientError as exc:
            if _code(exc) not in {"BucketAlreadyOwnedByYou", "BucketAlreadyExists"}:
                raise self._error("create bucket", "", exc) from None
        except BotoCoreError as exc:
            raise self._error("create bucket", "", exc) from None

    def _error(self, action: str, key: str, exc: Exception) -> StorageError:
        where = f"bucket {self.bucket!r} at {self._client.meta.endpoint_url}"
        what = f"S3 {action} of {key!r}" if key else f"S3 {action}"
        if isinstance(exc, NoCredentialsError):
            return StorageError(
                f"{what} failed: no S3 credentials; pass access_key/secret_key or set "
                "AWS_ACCESS_KEY_ID and AWS_SECRET_ACCESS_KEY"
            )
        if isinstance(exc, EndpointConnectionError):
            endpoint = self._client.meta.endpoint_url
            return StorageError(f"{what} failed: cannot reach the S3 endpoint {endpoint}; check endpoint_url and "
                                "that the server runs")
        cause = exc if isinstance(exc, ClientError) else exc.__cause__ or exc.__context__
        if not isinstance(cause, ClientError):
            return StorageError(f"{what} in {where} failed: {exc}")
        code = _code(cause)
        if code in _MISSING_CODES and action in ("get", "delete"):
            return ResultMissing(f"no result stored under {key!r} in {where}")
        message = cause.response.get("Error", {}).get("Message", "")
        hint = _HINTS.get(code, "see the S3 server's logs")
        return StorageError(f"{what} in {where} failed: {code} ({message}); {hint}")


def _code(exc: ClientError) -> str:
    return str(exc.response.get("Error", {}).get("Code", ""))
