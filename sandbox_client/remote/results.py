"""Checking a downloaded result before anything in it is loaded: its sha256, then the server's
Ed25519 signature over ``storage.result_message(job_id, sha256)``, then a pickle-free decode.

    values = verified_values(job_id, data, job["result"], public_key_b64)    # {node id: value}

Any mismatch raises ``ResultVerificationError`` and decodes nothing.
"""
from __future__ import annotations

import hashlib
from collections.abc import Mapping
from typing import Any

from ..errors import ResultVerificationError


def verified_values(job_id: str, data: bytes, result: Mapping[str, Any], public_key_b64: str) -> dict[int, Any]:
    """Verify ``data`` against the job's ``result`` record (sha256, signature), then decode it."""
    import storage

    verify_result(job_id, data, result, public_key_b64)
    try:
        values = storage.decode_results(data)
    except storage.BundleError as err:
        raise ResultVerificationError("bad_bundle", f"the signed result of job {job_id} cannot be decoded: {err}; "
                                      "update sandbox_client to the server's version") from None
    return {int(key): value for key, value in values.items()}


def verify_result(job_id: str, data: bytes, result: Mapping[str, Any], public_key_b64: str) -> None:
    """Raise ResultVerificationError unless ``data`` is exactly what the server signed for ``job_id``."""
    import storage

    expected = str(result.get("sha256", ""))
    actual = hashlib.sha256(data).hexdigest()
    if actual != expected:
        raise ResultVerificationError(
            "sha256_mismatch", f"the result of job {job_id} was altered in storage or in transit: its sha256 is "
            f"{actual}, the server recorded {expected or 'nothing'}; nothing was loaded. Run the job again; if this "
            "repeats, tell the server's admin")
    try:
        storage.verify_signature(public_key_b64, storage.result_message(job_id, expected),
                                 str(result.get("signature", "")))
    except storage.SignatureError as err:   # a wrong or malformed key, signature or message
        raise ResultVerificationError(
            "bad_signature", f"the result of job {job_id} is not signed by the server's key ({err}); nothing was "
            "loaded. If the server rotated its key, remove its line from the known_servers file and connect "
            "again") from None
