"""Result storage (issue 4): where result bundles live, their file format, and their signatures.

    >>> from storage import LocalStore, Signer, encode_results, result_message
    >>> data = encode_results({"3": hidden_states})
    >>> store = LocalStore(Path("results")); store.put("results/abc", data)
    >>> signature = Signer.load_or_create(Path("keys/signing.pem")).sign(result_message(job_id, sha256_hex))

``types`` names the vocabulary (``ResultStore``, ``StorageError``), ``local``/``s3`` are the two
stores, ``bundle`` is the safetensors result format, ``signing`` the Ed25519 signatures. The S3
store (boto3) and the bundle format (torch) load on first use: clients that only decode and verify
never load boto3, and the server's supervisor, which only signs keys and sweeps, never loads torch.
"""
from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

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
    from storage.bundle import BundleError, decode_results, encode_results
    from storage.s3 import S3Store

_LAZY = {"BundleError": "storage.bundle", "decode_results": "storage.bundle", "encode_results": "storage.bundle",
         "S3Store": "storage.s3"}

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
    if name not in _LAZY:
        raise AttributeError(f"module 'storage' has no attribute {name!r}")
    module = importlib.import_module(_LAZY[name])
    globals().update({n: getattr(module, n) for n, where in _LAZY.items() if where == _LAZY[name]})
    return globals()[name]
