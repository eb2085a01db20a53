"""Where SmolLM2's converted folder goes: $INTERP_SANDBOX_CACHE, the checkout, $XDG_CACHE_HOME, ~/.cache; and a
folder that cannot be created is one clear error naming the variable to set."""
from __future__ import annotations

import os
from pathlib import Path

import pytest

import sandbox_client.pretrained as pretrained
from sandbox_client.pretrained import CACHE_ENV, default_cache_dir, smollm2_folder

ROOT = Path(__file__).resolve().parents[2]


def test_the_environment_variable_wins(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv(CACHE_ENV, str(tmp_path / "mine"))
    assert default_cache_dir() == tmp_path / "mine"


def test_a_source_checkout_caches_inside_it(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv(CACHE_ENV, raising=False)
    assert default_cache_dir() == ROOT / ".cache" / "models"


def test_an_installed_package_follows_xdg_then_home(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Installed (no pyproject.toml beside the package): $XDG_CACHE_HOME if absolute, else ~/.cache."""
    monkeypatch.delenv(CACHE_ENV, raising=False)
    fake = tmp_path / "site-packages" / "sandbox_client" / "pretrained.py"
    monkeypatch.setattr(pretrained, "__file__", str(fake))
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    assert default_cache_dir() == tmp_path / "xdg" / "interp-sandbox"
    monkeypatch.setenv("XDG_CACHE_HOME", "relative/ignored")      # the XDG spec: relative paths are invalid
    assert default_cache_dir() == tmp_path / "home" / ".cache" / "interp-sandbox"
    monkeypatch.delenv("XDG_CACHE_HOME")
    assert default_cache_dir() == tmp_path / "home" / ".cache" / "interp-sandbox"


@pytest.mark.skipif(os.geteuid() == 0, reason="root may write anywhere")
def test_an_unwritable_cache_says_which_variable_to_set(tmp_path: Path) -> None:
    locked = tmp_path / "locked"
    locked.mkdir(mode=0o500)
    try:
        with pytest.raises(PermissionError, match=CACHE_ENV):
            smollm2_folder(locked / "cache")
    finally:
        locked.chmod(0o700)
