"""Ed25519 signatures over results, so that a client can prove which server produced a bundle.

    >>> signer = Signer.load_or_create(Path("/var/lib/sandbox/keys/result-signing.pem"))
    >>> signature = signer.sign(result_message(job_id, sha256_hex))
    >>> verify_signature(signer.public_key_b64, result_message(job_id, sha256_hex), signature)  # or SignatureError

What is signed is ``result_message(job_id, sha256)``: the job id binds a bundle to the request
that asked for it (a server cannot answer job A with job B's results), the SHA-256 binds it to
the exact bytes. The server publishes ``public_key_b64`` (base64 of the raw 32-byte key) and
``fingerprint`` (``"SHA256:"`` + unpadded base64 of its SHA-256, as OpenSSH prints keys) at
``GET /v1/public-key``; clients pin the fingerprint and check every result against the key.

The private key is a PKCS#8 PEM file, created on first use with mode 0600 (its folder 0700 when
created). A key file that group or others can read is refused: whoever reads it can forge results.

Key rotation: stop the server, move the old key file away (keep it while old results may still
be checked), start the server, which creates a new key at the same path, and announce the new
fingerprint (``GET /v1/public-key``, or ``Signer.load_or_create(path).fingerprint``) so that
clients re-pin it. Results signed by the old key then fail verification against the new one; there is
no overlap period, so rotate when no results are waiting to be fetched.
"""
from __future__ import annotations

import base64
import binascii
import hashlib
import os
import re
import secrets
import stat
from pathlib import Path

from cryptography.exceptions import InvalidSignature, UnsupportedAlgorithm
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey, Ed25519PublicKey

ALGORITHM = "ed25519"
MESSAGE_PREFIX = b"interp-sandbox result v1\n"
_SHA256_HEX = re.compile(r"[0-9a-f]{64}")


class SignatureError(Exception):
    """A signature, public key or signed message is malformed, or the signature does not match."""


class SigningKeyError(Exception):
    """The private key file cannot be used (unsafe permissions, not an Ed25519 PEM key, unreadable)."""


class Signer:
    """Signs messages with one Ed25519 private key; see the module docstring for the key file."""

    def __init__(self, private_key: Ed25519PrivateKey) -> None:
        self._key = private_key
        raw = private_key.public_key().public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw)
        self.public_key_b64 = base64.b64encode(raw).decode("ascii")
        self.fingerprint = _fingerprint(raw)

    def __repr__(self) -> str:
        return f"Signer({self.fingerprint})"

    @classmethod
    def generate(cls) -> Signer:
        """A signer with a fresh key that lives only in memory (tests, throwaway servers)."""
        return cls(Ed25519PrivateKey.generate())

    @classmethod
    def load_or_create(cls, path: Path | str) -> Signer:
        """Load the key at ``path``, or create one there (0600) if the file does not exist."""
        path = Path(path)
        if not path.exists():
            _create_key_file(path)
        return cls(_load_key_file(path))

    def sign(self, message: bytes) -> str:
        """The base64 Ed25519 signature of ``message``."""
        return base64.b64encode(self._key.sign(message)).decode("ascii")


def verify_signature(public_key_b64: str, message: bytes, signature_b64: str) -> None:
    """Return if ``signature_b64`` is ``public_key_b64``'s signature of ``message``; else raise SignatureError.

    >>> verify_signature(signer.public_key_b64, b"hello", signer.sign(b"hello"))
    """
    raw_key = _b64(public_key_b64, "public key", 32)
    raw_signature = _b64(signature_b64, "signature", 64)
    if not isinstance(message, bytes):
        raise SignatureError(f"the signed message must be bytes, got {type(message).__name__}")
    try:
        Ed25519PublicKey.from_public_bytes(raw_key).verify(raw_signature, message)
    except InvalidSignature:
        raise SignatureError(
            "the result's signature does not match the server's public key: the bytes were altered, "
            "or they were signed by another key (if the server rotated its key, re-pin its fingerprint)"
        ) from None
    except ValueError as exc:
        raise SignatureError(f"the public key is not a valid Ed25519 key: {exc}") from None


def public_key_fingerprint(public_key_b64: str) -> str:
    """The ``SHA256:...`` fingerprint of a base64 raw public key (what clients pin); SignatureError if malformed."""
    return _fingerprint(_b64(public_key_b64, "public key", 32))


def result_message(job_id: str, sha256_hex: str) -> bytes:
    """The bytes the server signs for a result: ``b"interp-sandbox result v1\\n<job_id>\\n<sha256>"``.

    Raises SignatureError for a job id with a newline (or empty) and for anything but 64
    lowercase hex digits, so that no two (job id, sha256) pairs give the same message.
    """
    if not isinstance(job_id, str) or not job_id or "\n" in job_id or len(job_id) > 256:
        raise SignatureError("a job id in a signed result must be a non-empty string without newlines")
    if not isinstance(sha256_hex, str) or not _SHA256_HEX.fullmatch(sha256_hex):
        raise SignatureError("a result's sha256 must be 64 lowercase hex digits")
    return MESSAGE_PREFIX + job_id.encode("utf-8") + b"\n" + sha256_hex.encode("ascii")


def _fingerprint(raw_public_key: bytes) -> str:
    digest = hashlib.sha256(raw_public_key).digest()
    return "SHA256:" + base64.b64encode(digest).decode("ascii").rstrip("=")


def _b64(text: object, what: str, length: int) -> bytes:
    if not isinstance(text, str):
        raise SignatureError(f"the {what} must be a base64 string, got {type(text).__name__}")
    try:
        raw = base64.b64decode(text.encode("ascii"), validate=True)
    except (binascii.Error, UnicodeEncodeError):
        raise SignatureError(f"the {what} is not valid base64") from None
    if len(raw) != length:
        raise SignatureError(f"the {what} must be {length} bytes, got {len(raw)}")
    return raw


def _create_key_file(path: Path) -> None:
    if not path.parent.exists():
        path.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
    pem = Ed25519PrivateKey.generate().private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
    )
    tmp = path.with_name(f".{path.name}.{secrets.token_hex(8)}.tmp")
    try:
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        with os.fdopen(fd, "wb") as f:
            os.fchmod(f.fileno(), 0o600)  # whatever the umask
            f.write(pem)
            f.flush()
            os.fsync(f.fileno())
        try:
            os.link(tmp, path)  # fails if another process created the key first; then we load theirs
        except FileExistsError:
            pass
    except OSError as exc:
        raise SigningKeyError(f"cannot create the signing key {path}: {exc.strerror or exc}") from None
    finally:
        tmp.unlink(missing_ok=True)


def _load_key_file(path: Path) -> Ed25519PrivateKey:
    try:
        mode = path.stat().st_mode
        if not stat.S_ISREG(mode):
            raise SigningKeyError(f"the signing key {path} is not a regular file")
        if os.name == "posix" and mode & 0o077:
            raise SigningKeyError(
                f"the signing key {path} is open to group or others (mode {stat.S_IMODE(mode):04o}); "
                f"run: chmod 600 {path}"
            )
        data = path.read_bytes()
    except OSError as exc:
        raise SigningKeyError(f"cannot read the signing key {path}: {exc.strerror or exc}") from None
    try:
        key = serialization.load_pem_private_key(data, password=None)
    except (ValueError, TypeError, UnsupportedAlgorithm) as exc:
        raise SigningKeyError(f"{path} is not an unencrypted PEM private key ({exc}); move it away to make a new one") \
            from None
    if not isinstance(key, Ed25519PrivateKey):
        raise SigningKeyError(
            f"{path} holds a {type(key).__name__}, not an Ed25519 key; move it away to make a new one"
        )
    return key
