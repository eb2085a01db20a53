"""The storage vocabulary: the ``ResultStore`` protocol, its errors, and what a valid key is.

    >>> store: ResultStore = LocalStore(Path("/var/lib/sandbox/results"))
    >>> store.put("results/abc", b"bundle bytes"); store.get("results/abc")
    b'bundle bytes'

Keys are opaque to users (the server makes them: ``"results/" + secrets.token_urlsafe(32)``), but
every store checks them with ``check_key`` so that no key can name a path outside its store.
"""
from __future__ import annotations

import re
from typing import Protocol

MAX_KEY_LENGTH = 512
_SEGMENT = re.compile(r"[A-Za-z0-9_-]+")


class StorageError(Exception):
    """A store could not do what was asked; the message says which key, which store, and what to check."""


class ResultMissing(StorageError):
    """There is no object under this key (never stored, deleted, or expired)."""


class ResultStore(Protocol):
    """Where finished jobs' result bundles live: a local folder or an S3-compatible bucket."""

    def put(self, key: str, data: bytes) -> None:
        """Store ``data`` under ``key``, replacing any previous object atomically."""
        ...

    def get(self, key: str) -> bytes:
        """The bytes stored under ``key``; raises ResultMissing when there are none."""
        ...

    def delete(self, key: str) -> None:
        """Remove ``key``; deleting a missing key is not an error."""
        ...

    def url(self, key: str, expires_s: int) -> str | None:
        """A presigned direct-download URL valid for at most 15 minutes, or None if the store has none."""
        ...


def check_data(data: object) -> bytes | bytearray | memoryview:
    """Return ``data`` if it is bytes-like; else raise StorageError (a store keeps bytes, not text or objects)."""
    if not isinstance(data, (bytes, bytearray, memoryview)):
        raise StorageError(f"a store keeps bytes, got {type(data).__name__}; encode the result first (encode_results)")
    return data


def check_key(key: object) -> str:
    """Return ``key`` if it is ``seg/seg/...`` with segments of ``[A-Za-z0-9_-]``; else raise StorageError.

    >>> check_key("results/Ab_-9")
    'results/Ab_-9'

    This rules out absolute paths, ``..``, empty segments, backslashes and every character
    that a filesystem or an URL would treat specially.
    """
    if not isinstance(key, str):
        raise StorageError(f"a result key must be a string, got {type(key).__name__}")
    if not key or len(key) > MAX_KEY_LENGTH:
        raise StorageError(f"a result key must have 1 to {MAX_KEY_LENGTH} characters, got {len(key)}")
    for segment in key.split("/"):
        if not _SEGMENT.fullmatch(segment):
            raise StorageError(
                f"invalid result key {key[:80]!r}: use segments of letters, digits, '_' and '-' "
                "separated by single '/' (no leading '/', no '..', no empty segments)"
            )
    return key
