"""sandbox_server.auth: the key format, hashing, and who gets 401 / 403."""
from __future__ import annotations

import hashlib
import re
from pathlib import Path

import pytest

from sandbox_server.auth import authenticate, hash_secret, new_key_material
from sandbox_server.db import Database
from sandbox_server.errors import ApiError
from sandbox_server.keys import create_key, revoke_key


@pytest.fixture
def db(tmp_path: Path) -> Database:
    return Database(tmp_path / "sandbox.db")


def test_key_material_format() -> None:
    key_id, secret, plaintext = new_key_material()
    assert plaintext == f"isk_{key_id}_{secret}"
    assert re.fullmatch(r"[0-9a-f]{12}", key_id)
    assert re.fullmatch(r"[A-Za-z0-9_-]{43}", secret)          # secrets.token_urlsafe(32)
    assert new_key_material()[1] != secret


def test_only_the_secret_hash_is_stored(db: Database) -> None:
    record, plaintext = create_key(db, "alice")
    secret = plaintext.split("_", 2)[2]
    stored = db.get_key(record.id)
    assert stored is not None and stored.secret_hash == hashlib.sha256(secret.encode()).hexdigest()
    assert stored.secret_hash == hash_secret(secret)
    assert secret not in db.path.read_bytes().decode("latin-1")


def test_valid_key_authenticates(db: Database) -> None:
    record, plaintext = create_key(db, "alice")
    assert authenticate(f"Bearer {plaintext}", db) == record
    assert authenticate(f"bearer {plaintext}  ", db) == record


@pytest.mark.parametrize("header", [None, "", "Basic abc", "Bearer", "Bearer isk_", "Bearer sk-123",
                                    "Bearer isk_zz_" + "a" * 43, "isk_0123456789ab_" + "a" * 43])
def test_missing_or_malformed_is_401(db: Database, header: str | None) -> None:
    with pytest.raises(ApiError) as err:
        authenticate(header, db)
    assert (err.value.status, err.value.code) == (401, "unauthorized")
    assert err.value.headers.get("WWW-Authenticate", "").startswith("Bearer")


def test_unknown_id_and_wrong_secret_are_401(db: Database) -> None:
    record, plaintext = create_key(db, "alice")
    secret = plaintext.split("_", 2)[2]
    wrong_secret = "isk_" + record.id + "_" + ("A" if secret[0] != "A" else "B") + secret[1:]
    unknown_id = "isk_" + "0" * 12 + "_" + secret
    for header in (wrong_secret, unknown_id):
        with pytest.raises(ApiError) as err:
            authenticate(f"Bearer {header}", db)
        assert (err.value.status, err.value.code) == (401, "unauthorized")


def test_revoked_key_is_403_but_only_with_its_secret(db: Database) -> None:
    record, plaintext = create_key(db, "alice")
    revoke_key(db, "alice")
    with pytest.raises(ApiError) as err:
        authenticate(f"Bearer {plaintext}", db)
    assert (err.value.status, err.value.code) == (403, "key_revoked")
    with pytest.raises(ApiError) as err:     # a guesser learns nothing about revoked keys
        authenticate(f"Bearer isk_{record.id}_" + "x" * 43, db)
    assert err.value.status == 401
