"""Result storage (issue 4): where result bundles live, their file format, and their signatures.

    >>> from storage import LocalStore, Signer, encode_results, result_message
    >>> data = encode_results({"3": hidden_states})
    >>> store = LocalStore(Path("results")); store.put("results/abc", data)
    >>> signature = Signer.load_or_create(Path("keys/signing.pem")).sign(result_message(job_id, sha256_hex))

``types`` names the vocabulary (``ResultStore``, ``StorageError``), ``local``/``s3`` are the two
stores, ``bundle`` is the safetensors result format, ``signing`` the Ed25519 signatures. The S3
store (boto3) is imported on first use, so clients that only decode and verify never load boto3.
"""
from __future__ import annotations

from typing import TYPE_CHECKING, Any

from storage.bundle import BundleError, decode_results, encode_results
from storage.local import LocalStore
from storage.signing import (
    SignatureError,
    Signer,
    SigningKeyError,
    public_key_fingerprint,
    result_message,
    verify_signature,
)
from storage.types import ResultMissing, ResultStore, StorageError, check_key

if TYPE_CHECKING:
    from storage.s3 import S3Store

__all__ = [
    "BundleError",
    "LocalStore",
    "ResultMissing",
    "ResultStore",
    "S3Store",
    "SignatureError",
    "Signer",
    "SigningKeyError",
    "StorageError",
    "check_key",
    "decode_results",
    "encode_results",
    "public_key_fingerprint",
    "result_message",
    "verify_signature",
]


def __getattr__(name: str) -> Any:
    if name == "S3Store":
        from storage.s3 import S3Store

        return S3Store
    raise AttributeError(f"module 'storage' has no attribute {name!r}")
