"""Known servers: each server's Ed25519 public key, pinned on first use (like ssh's known_hosts).

    known = KnownServers()                       # ~/.config/interp-sandbox/known_servers, or $INTERP_SANDBOX_CONFIG_DIR
    key = server_key("http://127.0.0.1:8000", advertised="MCow...", known=known)   # pins, or checks the pin

One line per server, ``<host-url> ed25519 <public_key_b64>``; the file is private (0600). A
server whose advertised key differs from its pin is refused until the user removes the line
(after checking with the server's admin that the key really was rotated).
"""
from __future__ import annotations

import os
from pathlib import Path

from ..errors import ResultVerificationError

CONFIG_ENV = "INTERP_SANDBOX_CONFIG_DIR"
FILE_NAME = "known_servers"
ALGORITHM = "ed25519"


def config_dir() -> Path:
    """The client's config folder: ``$INTERP_SANDBOX_CONFIG_DIR`` or ``~/.config/interp-sandbox``."""
    override = os.environ.get(CONFIG_ENV)
    return Path(override) if override else Path.home() / ".config" / "interp-sandbox"


class KnownServers:
    """The pin file ``<folder>/known_servers``."""

    def __init__(self, folder: Path | None = None) -> None:
        self.path = (folder if folder is not None else config_dir()) / FILE_NAME

    def get(self, host: str) -> str | None:
        """The pinned key of ``host`` (a normalized URL), or None."""
        for line_host, key in self._entries():
            if line_host == host:
                return key
        return None

    def add(self, host: str, public_key_b64: str) -> None:
        """Append a pin line; the folder is created 0700, the file 0600."""
        self.path.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
        fd = os.open(self.path, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o600)
        with os.fdopen(fd, "a", encoding="utf-8") as file:
            file.write(f"{host} {ALGORITHM} {public_key_b64}\n")
        os.chmod(self.path, 0o600)

    def _entries(self) -> list[tuple[str, str]]:
        try:
            text = self.path.read_text(encoding="utf-8")
        except FileNotFoundError:
            return []
        entries = []
        for line in text.splitlines():
            parts = line.split()
            if len(parts) == 3 and not parts[0].startswith("#") and parts[1] == ALGORITHM:
                entries.append((parts[0], parts[2]))
        return entries


def server_key(host: str, advertised: str, known: KnownServers, explicit: str | None = None) -> tuple[str, bool]:
    """The key to verify ``host``'s results with, and whether it was pinned just now.

    ``explicit`` (``RemoteModel(public_key=...)``) wins over the pin file and is not written to it.
    Raises ResultVerificationError('pin_mismatch') when the server advertises another key.
    """
    if explicit is not None:
        if explicit.strip() != advertised:
            raise ResultVerificationError(
                "pin_mismatch", f"{host} advertises the public key {advertised}, not the public_key= you gave "
                f"({explicit.strip()}); if the server's admin confirms the new key, pass that one")
        return advertised, False
    pinned = known.get(host)
    if pinned is None:
        known.add(host, advertised)
        return advertised, True
    if pinned != advertised:
        raise ResultVerificationError(
            "pin_mismatch", f"{host} now advertises the public key {advertised}, but {known.path} pins {pinned}. "
            f"Someone may be impersonating the server. If its admin confirms the key was rotated, delete the line "
            f"for {host} from {known.path} and connect again")
    return pinned, False
