"""storage/signing.py: Ed25519 result signatures and the private key file.

References: the ``cryptography`` primitives used directly (keys read from the PEM file by hand),
``hashlib``/``base64`` for the fingerprint, and ``os.stat`` for file modes.
"""
from __future__ import annotations

import base64
import hashlib
import re
import stat
import threading
from pathlib import Path

import pytest
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey, Ed25519PublicKey

from storage import SignatureError, Signer, SigningKeyError, public_key_fingerprint, result_message, verify_signature

SHA = hashlib.sha256(b"bundle").hexdigest()


@pytest.fixture
def key_path(tmp_path: Path) -> Path:
    return tmp_path / "keys" / "signing.pem"


@pytest.fixture
def signer(key_path: Path) -> Signer:
    return Signer.load_or_create(key_path)


def pem_key(path: Path) -> Ed25519PrivateKey:
    key = serialization.load_pem_private_key(path.read_bytes(), password=None)
    assert isinstance(key, Ed25519PrivateKey)
    return key


def raw_public(key: Ed25519PrivateKey) -> bytes:
    return key.public_key().public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw)


def flip_b64(text: str) -> str:
    raw = bytearray(base64.b64decode(text))
    raw[len(raw) // 2] ^= 0x01
    return base64.b64encode(bytes(raw)).decode()


def test_result_message_is_the_documented_bytes() -> None:
    assert result_message("job-1", SHA) == b"interp-sandbox result v1\njob-1\n" + SHA.encode()


@pytest.mark.parametrize(("job_id", "sha"), [
    ("a\nb", SHA), ("", SHA), ("job", SHA.upper()), ("job", SHA[:-1]), ("job", SHA + "0"), ("job", "g" * 64),
    (None, SHA), ("job", None),
])
def test_result_message_refuses_ambiguous_inputs(job_id: object, sha: object) -> None:
    with pytest.raises(SignatureError):
        result_message(job_id, sha)  # type: ignore[arg-type]


def test_sign_verifies_with_the_raw_public_key(signer: Signer, key_path: Path) -> None:
    message = result_message("job-1", SHA)
    signature = signer.sign(message)
    verify_signature(signer.public_key_b64, message, signature)
    # Independently: the key in the PEM file, the published raw bytes, and cryptography's verifier.
    raw = raw_public(pem_key(key_path))
    assert base64.b64decode(signer.public_key_b64) == raw and len(raw) == 32
    Ed25519PublicKey.from_public_bytes(raw).verify(base64.b64decode(signature), message)
    assert pem_key(key_path).sign(message) == base64.b64decode(signature)  # Ed25519 is deterministic


def test_fingerprint_is_unpadded_base64_sha256_of_the_raw_key(signer: Signer, key_path: Path) -> None:
    digest = hashlib.sha256(raw_public(pem_key(key_path))).digest()
    expected = "SHA256:" + base64.b64encode(digest).decode().rstrip("=")
    assert signer.fingerprint == expected == public_key_fingerprint(signer.public_key_b64)
    assert "=" not in signer.fingerprint and len(signer.fingerprint) == 7 + 43


def test_wrong_key_is_refused(signer: Signer) -> None:
    message = result_message("job-1", SHA)
    other = Signer.generate()
    with pytest.raises(SignatureError, match="does not match"):
        verify_signature(other.public_key_b64, message, signer.sign(message))


def test_tampered_message_is_refused(signer: Signer) -> None:
    signature = signer.sign(result_message("job-1", SHA))
    other_sha = hashlib.sha256(b"other bundle").hexdigest()
    for message in (result_message("job-2", SHA), result_message("job-1", other_sha), b"", b"x"):
        with pytest.raises(SignatureError):
            verify_signature(signer.public_key_b64, message, signature)


def test_tampered_signature_is_refused(signer: Signer) -> None:
    message = result_message("job-1", SHA)
    with pytest.raises(SignatureError):
        verify_signature(signer.public_key_b64, message, flip_b64(signer.sign(message)))


@pytest.mark.parametrize(("public_key", "signature"), [
    ("not base64!", "ok"), ("", "ok"), ("ok", "not base64!"), ("ok", ""), ("AAAA", "ok"), ("ok", "AAAA"),
    (None, "ok"), ("ok", None), ("ok", b"bytes"), ("ok", "é"),
])
def test_malformed_inputs_are_signature_errors(signer: Signer, public_key: object, signature: object) -> None:
    message = b"m"
    public_key = signer.public_key_b64 if public_key == "ok" else public_key
    signature = signer.sign(message) if signature == "ok" else signature
    with pytest.raises(SignatureError):
        verify_signature(public_key, message, signature)  # type: ignore[arg-type]


def test_message_must_be_bytes(signer: Signer) -> None:
    with pytest.raises(SignatureError):
        verify_signature(signer.public_key_b64, "m", signer.sign(b"m"))  # type: ignore[arg-type]


def test_low_order_public_key_never_verifies() -> None:
    # The all-zero point has small order; a signature of zeros must not pass for it.
    with pytest.raises(SignatureError):
        verify_signature(base64.b64encode(bytes(32)).decode(), b"m", base64.b64encode(bytes(64)).decode())


def test_new_key_file_is_0600_and_new_folder_0700(signer: Signer, key_path: Path, open_umask: None) -> None:
    path = key_path.parent / "sub" / "k.pem"
    Signer.load_or_create(path)
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    assert stat.S_IMODE(path.parent.stat().st_mode) == 0o700
    assert stat.S_IMODE(key_path.stat().st_mode) == 0o600
    assert path.read_bytes().startswith(b"-----BEGIN PRIVATE KEY-----")
    assert [p.name for p in path.parent.iterdir()] == ["k.pem"]  # no temporary file left


def test_existing_folder_keeps_its_mode(tmp_path: Path) -> None:
    tmp_path.chmod(0o755)
    Signer.load_or_create(tmp_path / "k.pem")
    assert stat.S_IMODE(tmp_path.stat().st_mode) == 0o755


def test_second_load_gives_the_same_key(signer: Signer, key_path: Path) -> None:
    again = Signer.load_or_create(key_path)
    assert again.public_key_b64 == signer.public_key_b64
    verify_signature(again.public_key_b64, b"m", signer.sign(b"m"))


@pytest.mark.parametrize("mode", [0o644, 0o640, 0o604, 0o660, 0o606])
def test_key_readable_or_writable_by_others_is_refused(signer: Signer, key_path: Path, mode: int) -> None:
    key_path.chmod(mode)
    with pytest.raises(SigningKeyError, match=re.escape(f"chmod 600 {key_path}")):
        Signer.load_or_create(key_path)


def test_owner_only_modes_are_accepted(signer: Signer, key_path: Path) -> None:
    key_path.chmod(0o400)
    assert Signer.load_or_create(key_path).fingerprint == signer.fingerprint


def test_non_ed25519_or_garbage_key_files_are_refused(tmp_path: Path) -> None:
    ec_pem = ec.generate_private_key(ec.SECP256R1()).private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption())
    encrypted = Ed25519PrivateKey.generate().private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
        serialization.BestAvailableEncryption(b"password"))
    for name, content in [("ec", ec_pem), ("garbage", b"not a key"), ("empty", b""), ("encrypted", encrypted)]:
        path = tmp_path / f"{name}.pem"
        path.write_bytes(content)
        path.chmod(0o600)
        with pytest.raises(SigningKeyError, match=re.escape(str(path))):
            Signer.load_or_create(path)


def test_a_folder_is_not_a_key(tmp_path: Path) -> None:
    (tmp_path / "k.pem").mkdir()
    with pytest.raises(SigningKeyError, match="not a regular file"):
        Signer.load_or_create(tmp_path / "k.pem")


def test_concurrent_first_use_agrees_on_one_key(tmp_path: Path) -> None:
    """Several server processes starting at once must not end up with different keys."""
    path = tmp_path / "k.pem"
    found: list[str] = []
    threads = [threading.Thread(target=lambda: found.append(Signer.load_or_create(path).fingerprint))
               for _ in range(8)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert len(found) == 8 and len(set(found)) == 1
    assert [p.name for p in tmp_path.iterdir()] == ["k.pem"]
