"""Key pinning of remote servers (sandbox_client/remote/pins.py): first use writes a private pin file,
later uses check it, a mismatch changes nothing and says which line to remove.

Reference: storage's own Signer keys and the pin file's text as written on disk.
"""
from __future__ import annotations

import stat
from pathlib import Path

import pytest

import sandbox_client as sc
import storage
from sandbox_client.remote.pins import CONFIG_ENV, KnownServers, config_dir, server_key

# ----- key pinning ---------------------------------------------------------------------------------
KEY_A = storage.Signer.generate().public_key_b64
KEY_B = storage.Signer.generate().public_key_b64


def test_first_use_pins_a_private_file_then_checks_it(tmp_path):
    known = KnownServers(tmp_path / "cfg")
    assert server_key("http://h:1", KEY_A, known) == (KEY_A, True)
    assert known.path.read_text() == f"http://h:1 ed25519 {KEY_A}\n"
    assert stat.S_IMODE(known.path.stat().st_mode) == 0o600
    assert stat.S_IMODE(known.path.parent.stat().st_mode) == 0o700
    assert server_key("http://h:1", KEY_A, known) == (KEY_A, False)
    assert server_key("http://other:2", KEY_B, known) == (KEY_B, True)
    assert known.get("http://h:1") == KEY_A and known.get("http://other:2") == KEY_B


def test_pin_mismatch_says_which_line_to_remove_and_changes_nothing(tmp_path):
    known = KnownServers(tmp_path)
    known.add("http://h:1", KEY_A)
    before = known.path.read_text()
    with pytest.raises(sc.ResultVerificationError) as info:
        server_key("http://h:1", KEY_B, known)
    assert info.value.code == "pin_mismatch"
    assert str(known.path) in str(info.value) and "delete the line" in str(info.value)
    assert known.path.read_text() == before


def test_explicit_key_wins_and_is_not_pinned(tmp_path):
    known = KnownServers(tmp_path)
    known.add("http://h:1", KEY_B)
    assert server_key("http://h:1", KEY_A, known, explicit=KEY_A) == (KEY_A, False)
    with pytest.raises(sc.ResultVerificationError, match="public_key="):
        server_key("http://h:1", KEY_A, known, explicit=KEY_B)
    assert known.get("http://h:1") == KEY_B


def test_pin_file_ignores_comments_and_other_algorithms(tmp_path):
    known = KnownServers(tmp_path)
    known.path.write_text(f"# http://h:1 ed25519 {KEY_B}\nhttp://h:1 rsa xyz\n\nhttp://h:1 ed25519 {KEY_A}\n")
    assert known.get("http://h:1") == KEY_A
    assert known.get("http://nope:1") is None


def test_config_dir_from_env(monkeypatch, tmp_path):
    monkeypatch.setenv(CONFIG_ENV, str(tmp_path))
    assert config_dir() == tmp_path and KnownServers().path == tmp_path / "known_servers"
    monkeypatch.delenv(CONFIG_ENV)
    assert config_dir() == Path.home() / ".config" / "interp-sandbox"
