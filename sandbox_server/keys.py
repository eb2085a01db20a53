"""Managing API keys (the admin's side): create, list, revoke.

    record, plaintext = create_key(db, "alice", models=("tiny-gpt2",), rate=60, daily_jobs=1000)
    print(plaintext)                       # "isk_<id>_<secret>": shown once, never stored
    [k.name for k in list_keys(db)]
    revoke_key(db, "alice")                # by id or by name

Limits of 0 mean unlimited (stored as None). Names are unique among keys that are not revoked, so
that revoking by name revokes exactly one key.
"""
from __future__ import annotations

import sqlite3
import time
from collections.abc import Sequence

from .auth import hash_secret, new_key_material
from .db import Database
from .types import KeyRecord

MAX_NAME = 64


class KeyAdminError(ValueError):
    """A key command cannot be done; the message says what to change."""


def create_key(db: Database, name: str, models: Sequence[str] | None = None, rate: int = 0,
               daily_jobs: int = 0) -> tuple[KeyRecord, str]:
    """A new key for ``name``; ``models`` None = every model; ``rate`` jobs/minute and ``daily_jobs`` 0 = unlimited."""
    name = _check_name(name)
    if any(k.name == name and k.revoked is None for k in db.list_keys()):
        raise KeyAdminError(f"an active key named {name!r} exists; choose another name or revoke that key first")
    allowed = _check_models(models)
    for what, value in (("rate", rate), ("daily jobs", daily_jobs)):
        if isinstance(value, bool) or not isinstance(value, int) or value < 0:
            raise KeyAdminError(f"{what} must be a whole number >= 0 (0 = unlimited), got {value!r}")
    for _ in range(3):   # a 48-bit id collides only by freak chance; try again rather than fail
        key_id, secret, plaintext = new_key_material()
        record = KeyRecord(id=key_id, name=name, secret_hash=hash_secret(secret), models=allowed,
                           rate_per_minute=rate or None, daily_jobs=daily_jobs or None, created=time.time())
        try:
            db.insert_key(record)
        except sqlite3.IntegrityError:
            continue
        return record, plaintext
    raise KeyAdminError("could not find a free key id; try again")


def list_keys(db: Database) -> list[KeyRecord]:
    """Every key, oldest first, revoked ones included (their ``revoked`` time is set)."""
    return db.list_keys()


def revoke_key(db: Database, id_or_name: str) -> KeyRecord:
    """Revoke the active key with this id or name; returns it as it was. Jobs it queued still run."""
    active = [k for k in db.list_keys() if k.revoked is None and id_or_name in (k.id, k.name)]
    if not active:
        raise KeyAdminError(f"no active key with id or name {id_or_name!r}; see 'interp-sandbox keys list'")
    db.revoke_key(active[0].id)
    return active[0]


def _check_name(name: str) -> str:
    name = name.strip() if isinstance(name, str) else ""
    if not name or len(name) > MAX_NAME or not name.isprintable():
        raise KeyAdminError(f"a key name is 1 to {MAX_NAME} printable characters (e.g. the user's name), got {name!r}")
    return name


def _check_models(models: Sequence[str] | None) -> tuple[str, ...] | None:
    if models is None:
        return None
    names = tuple(dict.fromkeys(m.strip() for m in models if m.strip()))
    if not names:
        raise KeyAdminError("give at least one model name, or leave models out to allow every model")
    return names
