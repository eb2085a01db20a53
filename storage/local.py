"""``LocalStore``: result bundles as files in one folder (the default store; single-host deployments).

    >>> store = LocalStore(Path("/var/lib/sandbox/results"))
    >>> store.put("results/abc", b"...")
    >>> store.get("results/abc"), store.url("results/abc", 900)
    (b'...', None)

Writes are atomic (a temporary file in the same folder, then ``os.replace``), so a reader sees
the old object or the new one, never half of one. They are not flushed to disk one by one
(``fsync``): under 16 users that cost the model worker 40 ms of every 800 ms co-batch. A
result is a cache the job can recompute (24 hours by default), the server's database also
commits without waiting for the disk (SQLite WAL, ``synchronous=NORMAL``), and a file torn by
a power cut fails the client's SHA-256 and signature check, which says to run the job again.

Files are created 0600 and folders 0700: results belong to the users who asked for them, not
to other accounts on the host. A local store has no direct-download URL; the server streams
the bytes itself.
"""
from __future__ import annotations

import os
import secrets
from pathlib import Path

from storage.types import ResultMissing, StorageError, check_data, check_key

FILE_MODE = 0o600
DIR_MODE = 0o700


class LocalStore:
    """A ``ResultStore`` over the folder ``root`` (created 0700 if missing)."""

    def __init__(self, root: Path | str) -> None:
        self.root = Path(root)
        try:
            self.root.mkdir(mode=DIR_MODE, parents=True, exist_ok=True)
        except OSError as exc:
            raise StorageError(f"cannot create the result folder {self.root}: {exc.strerror}") from None
        if not self.root.is_dir():
            raise StorageError(f"the result folder {self.root} exists but is not a folder")

    def __repr__(self) -> str:
        return f"LocalStore({str(self.root)!r})"

    def put(self, key: str, data: bytes) -> None:
        path = self._path(key)
        check_data(data)
        tmp = path.with_name(f".{path.name}.{secrets.token_hex(8)}.tmp")  # '.' never starts a valid key
        try:
            self._make_parents(path)
            _write_new_file(tmp, data)
            os.replace(tmp, path)
        except OSError as exc:
            tmp.unlink(missing_ok=True)
            raise StorageError(f"cannot write result {key!r} to {self.root}: {exc.strerror or exc}") from None

    def get(self, key: str) -> bytes:
        path = self._path(key)
        try:
            return path.read_bytes()
        except (FileNotFoundError, NotADirectoryError, IsADirectoryError):
            raise ResultMissing(f"no result stored under {key!r} in {self.root}") from None
        except OSError as exc:
            raise StorageError(f"cannot read result {key!r} from {self.root}: {exc.strerror or exc}") from None

    def delete(self, key: str) -> None:
        path = self._path(key)
        try:
            path.unlink(missing_ok=True)
        except (NotADirectoryError, IsADirectoryError):
            return  # no file under this key: deleting it is a no-op
        except OSError as exc:
            raise StorageError(f"cannot delete result {key!r} from {self.root}: {exc.strerror or exc}") from None

    def url(self, key: str, expires_s: int) -> str | None:
        check_key(key)
        return None

    def _path(self, key: str) -> Path:
        return self.root.joinpath(*check_key(key).split("/"))

    def _make_parents(self, path: Path) -> None:
        # Path.mkdir(parents=True) would give intermediate folders the umask's mode, not 0700.
        missing = []
        folder = path.parent
        while folder != self.root and not folder.is_dir():
            missing.append(folder)
            folder = folder.parent
        for folder in reversed(missing):
            folder.mkdir(mode=DIR_MODE, exist_ok=True)


def _write_new_file(path: Path, data: bytes) -> None:
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | getattr(os, "O_NOFOLLOW", 0), FILE_MODE)
    with os.fdopen(fd, "wb") as f:
        f.write(data)
