"""API keys on the wire: ``Authorization: Bearer isk_<key_id>_<secret>``.

    key_id, secret, plaintext = new_key_material()      # plaintext = "isk_<key_id>_<secret>", shown once
    record = authenticate(request.headers.get("Authorization"), db)   # KeyRecord, or ApiError 401/403

The server stores only the secret's SHA-256 (hex); a stolen database gives no usable key. The
secret is ``secrets.token_urlsafe(32)`` (256 bits), so a plain hash is enough: there is nothing to
brute-force that a slow hash would protect. Hashes are compared in constant time, also for an
unknown key id, so timing does not tell which ids exist.
"""
from __future__ import annotations

import hashlib
import hmac
import re
import secrets

from .db import Database
from .errors import ApiError
from .types import KeyRecord

PREFIX = "isk_"
_BEARER = re.compile(r"[Bb]earer +isk_([0-9a-f]{8,32})_([A-Za-z0-9_-]{16,128})")
_DUMMY_HASH = hashlib.sha256(b"no such key").hexdigest()
_AUTH_HEADERS = {"WWW-Authenticate": 'Bearer realm="interp-sandbox"'}


def new_key_material() -> tuple[str, str, str]:
    """A fresh (key_id, secret, plaintext key). The key id is public (it names the key in lists and logs)."""
    key_id = secrets.token_hex(6)
    secret = secrets.token_urlsafe(32)
    return key_id, secret, f"{PREFIX}{key_id}_{secret}"


def hash_secret(secret: str) -> str:
    return hashlib.sha256(secret.encode("utf-8")).hexdigest()


def authenticate(header: str | None, db: Database) -> KeyRecord:
    """The key that ``header`` (the Authorization value) carries; else ApiError 401 ``unauthorized`` or
    403 ``key_revoked``."""
    if not header:
        raise ApiError(401, "unauthorized", "this route needs an API key: send 'Authorization: Bearer isk_...'",
                       headers=_AUTH_HEADERS)
    match = _BEARER.fullmatch(header.strip())
    if match is None:
        raise ApiError(401, "unauthorized", "the Authorization header must be 'Bearer isk_<key id>_<secret>', "
                       "exactly as 'interp-sandbox keys create' printed it", headers=_AUTH_HEADERS)
    key_id, secret = match.groups()
    record = db.get_key(key_id)
    expected = record.secret_hash if record is not None else _DUMMY_HASH
    if not hmac.compare_digest(hash_secret(secret), expected) or record is None:
        raise ApiError(401, "unauthorized", "unknown API key or wrong secret; check the key you were given",
                       headers=_AUTH_HEADERS)
    if record.revoked is not None:
        raise ApiError(403, "key_revoked", f"the API key {record.id} ({record.name}) was revoked; ask the "
                       "server's admin for a new one")
    return record
