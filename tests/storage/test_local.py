"""storage/local.py: LocalStore keeps results as 0600 files under one 0700 folder, written atomically.

The reference is the filesystem itself: ``os.stat`` modes, ``os.listdir`` and raw file reads.
"""
from __future__ import annotations

import os
import stat
import threading
from pathlib import Path

import pytest

from storage import LocalStore, ResultMissing, ResultStore, StorageError

BAD_KEYS = [
    "", "/abs", "/", "results/", "/results/x", "..", "../x", "results/../x", "a//b", "a/./b", ".", ".hidden",
    "a b", "a\\b", "a\nb", "a\x00b", "résultats/x", "a:b", "a?b", "a%2Fb", "~", "x" * 513,
]


@pytest.fixture
def root(tmp_path: Path) -> Path:
    return tmp_path / "results-root"


@pytest.fixture
def store(root: Path) -> LocalStore:
    return LocalStore(root)


def mode(path: Path) -> int:
    return stat.S_IMODE(os.stat(path).st_mode)


def all_files(root: Path) -> list[str]:
    return sorted(str(p.relative_to(root)) for p in root.rglob("*"))


def test_is_a_result_store(store: LocalStore) -> None:
    assert isinstance(store, LocalStore)
    as_protocol: ResultStore = store
    assert as_protocol.url("results/x", 900) is None


def test_put_get_overwrite_delete(store: LocalStore, root: Path) -> None:
    store.put("results/abc", b"first")
    assert (root / "results" / "abc").read_bytes() == b"first"
    assert store.get("results/abc") == b"first"
    store.put("results/abc", b"second")
    assert store.get("results/abc") == b"second"
    store.delete("results/abc")
    assert not (root / "results" / "abc").exists()
    with pytest.raises(ResultMissing):
        store.get("results/abc")


def test_binary_and_empty_payloads(store: LocalStore) -> None:
    payload = bytes(range(256)) * 1000
    store.put("k", payload)
    assert store.get("k") == payload
    store.put("empty", b"")
    assert store.get("empty") == b""


def test_missing_key_is_result_missing_with_the_key_in_the_message(store: LocalStore) -> None:
    with pytest.raises(ResultMissing, match="results/nothing"):
        store.get("results/nothing")
    assert issubclass(ResultMissing, StorageError)


def test_delete_is_idempotent(store: LocalStore) -> None:
    store.delete("results/never-stored")
    store.put("results/x", b"1")
    store.delete("results/x")
    store.delete("results/x")


def test_a_folder_is_not_a_result(store: LocalStore) -> None:
    store.put("results/a/b", b"1")
    with pytest.raises(ResultMissing):
        store.get("results/a")
    with pytest.raises(ResultMissing):
        store.get("results/a/b/c")  # a file where a folder would be
    store.delete("results/a")
    assert store.get("results/a/b") == b"1"


@pytest.mark.parametrize("key", BAD_KEYS)
def test_bad_keys_are_refused_before_touching_the_disk(store: LocalStore, root: Path, key: str) -> None:
    before = all_files(root)
    for call in (lambda: store.put(key, b"x"), lambda: store.get(key), lambda: store.delete(key),
                 lambda: store.url(key, 10)):
        with pytest.raises(StorageError) as info:
            call()
        assert not isinstance(info.value, ResultMissing)
    assert all_files(root) == before
    assert not (root.parent / "x").exists()


def test_non_string_key_is_refused(store: LocalStore) -> None:
    with pytest.raises(StorageError, match="string"):
        store.put(123, b"x")  # type: ignore[arg-type]


def test_non_bytes_data_is_refused_and_leaves_nothing(store: LocalStore, root: Path) -> None:
    with pytest.raises(StorageError, match="bytes"):
        store.put("results/x", "text")  # type: ignore[arg-type]
    assert all_files(root) == []
    store.put("results/y", bytearray(b"ok"))
    store.put("results/z", memoryview(b"ok"))
    assert store.get("results/y") == store.get("results/z") == b"ok"


def test_files_0600_and_folders_0700_whatever_the_umask(root: Path, open_umask: None) -> None:
    store = LocalStore(root)
    store.put("results/deep/er/key", b"secret")
    assert mode(root) == 0o700
    for folder in ("results", "results/deep", "results/deep/er"):
        assert mode(root / folder) == 0o700, folder
    assert mode(root / "results/deep/er/key") == 0o600
    store.put("results/deep/er/key", b"replaced")
    assert mode(root / "results/deep/er/key") == 0o600


def test_existing_root_keeps_its_mode(tmp_path: Path) -> None:
    tmp_path.chmod(0o750)
    LocalStore(tmp_path).put("k", b"v")
    assert mode(tmp_path) == 0o750


def test_root_that_is_a_file_is_refused(tmp_path: Path) -> None:
    (tmp_path / "file").write_bytes(b"")
    with pytest.raises(StorageError, match="not a folder|cannot create"):
        LocalStore(tmp_path / "file")


def test_failed_write_leaves_no_temporary_file(store: LocalStore, root: Path) -> None:
    store.put("results/a/b", b"1")
    with pytest.raises(StorageError, match="results/a"):
        store.put("results/a", b"2")  # a folder is in the way
    assert all_files(root) == ["results", "results/a", "results/a/b"]


def test_no_temporary_files_after_puts(store: LocalStore, root: Path) -> None:
    for i in range(5):
        store.put(f"results/k{i}", b"x" * i)
    assert all_files(root) == ["results"] + [f"results/k{i}" for i in range(5)]


def test_readers_never_see_a_partial_write(store: LocalStore) -> None:
    """A reader racing a writer sees one whole version or the other (atomic replace)."""
    versions = [b"A" * 1_000_000, b"B" * 1_000_000]
    store.put("results/race", versions[0])
    seen: list[bytes] = []
    stop = threading.Event()

    def read() -> None:
        while not stop.is_set():
            seen.append(store.get("results/race"))

    reader = threading.Thread(target=read)
    reader.start()
    try:
        for i in range(30):
            store.put("results/race", versions[i % 2])
    finally:
        stop.set()
        reader.join()
    assert seen and all(data in versions for data in seen)
