"""sandbox_server.keys: creating, listing and revoking API keys."""
from __future__ import annotations

from pathlib import Path

import pytest

from sandbox_server.auth import authenticate
from sandbox_server.db import Database
from sandbox_server.errors import ApiError
from sandbox_server.keys import KeyAdminError, create_key, list_keys, revoke_key


@pytest.fixture
def db(tmp_path: Path) -> Database:
    return Database(tmp_path / "sandbox.db")


def test_create_stores_limits_and_models(db: Database) -> None:
    record, plaintext = create_key(db, " alice ", models=["tiny-gpt2", "tiny-gpt2", "smollm2-135m"], rate=60,
                                   daily_jobs=1000)
    assert plaintext.startswith(f"isk_{record.id}_")
    assert record.name == "alice"
    assert record.models == ("tiny-gpt2", "smollm2-135m")
    assert (record.rate_per_minute, record.daily_jobs) == (60, 1000)
    assert db.get_key(record.id) == record
    assert record.may_use("tiny-gpt2") and not record.may_use("other")


def test_zero_limits_and_no_models_mean_unlimited(db: Database) -> None:
    record, _ = create_key(db, "bob", models=None, rate=0, daily_jobs=0)
    assert (record.models, record.rate_per_minute, record.daily_jobs) == (None, None, None)
    assert record.may_use("anything")


@pytest.mark.parametrize("kwargs", [dict(name=""), dict(name="x" * 65), dict(name="a\nb"), dict(models=[" "]),
                                    dict(rate=-1), dict(daily_jobs=1.5), dict(rate=True)])
def test_bad_arguments_say_what_to_change(db: Database, kwargs: dict) -> None:
    args = {"name": "carol", **kwargs}
    with pytest.raises(KeyAdminError):
        create_key(db, **args)
    assert list_keys(db) == []


def test_active_names_are_unique(db: Database) -> None:
    create_key(db, "alice")
    with pytest.raises(KeyAdminError, match="exists"):
        create_key(db, "alice")
    revoke_key(db, "alice")
    create_key(db, "alice")          # the name is free again once revoked
    assert [k.name for k in list_keys(db)] == ["alice", "alice"]


def test_revoke_by_id_or_name(db: Database) -> None:
    a, a_key = create_key(db, "alice")
    b, b_key = create_key(db, "bob")
    assert revoke_key(db, a.id).id == a.id
    assert revoke_key(db, "bob").id == b.id
    assert all(k.revoked is not None for k in list_keys(db))
    for plaintext in (a_key, b_key):
        with pytest.raises(ApiError) as err:
            authenticate(f"Bearer {plaintext}", db)
        assert err.value.code == "key_revoked"
    with pytest.raises(KeyAdminError, match="no active key"):
        revoke_key(db, "alice")


def test_many_keys_have_distinct_ids_and_secrets(db: Database) -> None:
    made = [create_key(db, f"user{i}") for i in range(20)]
    assert len({r.id for r, _ in made}) == len({p for _, p in made}) == 20
    assert [k.id for k in list_keys(db)] == [r.id for r, _ in made]
