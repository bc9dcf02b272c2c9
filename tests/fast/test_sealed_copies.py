"""A set's files are copied into this user's folder and hashed there once; a later start finds them
sealed and skips the hash, unless the copy changed since (presharded/start_caches.py: put_in_place)."""

import os
from pathlib import Path

import pytest

import presharded.workspace as private
import presharded.manifest
from presharded.manifest import CopiedFile, copy_hashed, hash_file
from presharded.workspace import SEALS, put_in_place


@pytest.fixture
def source(tmp_path: Path) -> tuple[Path, list[CopiedFile]]:
    folder = tmp_path / "ckpt"
    entries = []
    for name, data in [("a.img", os.urandom(300_000)), ("sub/b.img", b"b" * 1000)]:
        path = folder / "snapshots" / "set" / name
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(data)
        entries.append(CopiedFile(f"snapshots/set/{name}", len(data), hash_file(path)))
    return folder, entries


@pytest.fixture
def hashed(monkeypatch) -> list[Path]:
    """The files hashed from here on (a copy is hashed as it is written)."""
    calls: list[Path] = []

    def counting(path: Path) -> str:
        calls.append(Path(path))
        return hash_file(path)

    def counting_copy(source: Path, target: Path) -> str:
        calls.append(Path(target))
        return copy_hashed(source, target)

    monkeypatch.setattr(private, "hash_file", counting)
    monkeypatch.setattr(private, "copy_hashed", counting_copy)
    return calls


def put(source, workspace: Path) -> bool:
    folder, entries = source
    return put_in_place(workspace, folder, "set", entries, "snapshots", "the snapshot")


def test_a_copy_is_hashed_once(source, hashed, tmp_path):
    workspace = tmp_path / "copy"
    assert put(source, workspace)
    assert len(hashed) == 2  # each copy, once
    assert (workspace / SEALS / "a.img").is_file() and (workspace / SEALS / "sub" / "b.img").is_file()
    hashed.clear()
    assert put(source, workspace)
    assert hashed == []
    assert (workspace / "a.img").read_bytes() == (source[0] / source[1][0].path).read_bytes()


def test_a_copy_changed_after_its_seal_is_hashed_and_copied_again(source, hashed, tmp_path):
    workspace = tmp_path / "copy"
    assert put(source, workspace)
    with open(workspace / "a.img", "r+b") as f:  # same size, other bytes; its times set back as they were
        before = os.fstat(f.fileno())
        f.write(b"\0" * 4096)
    os.utime(workspace / "a.img", ns=(before.st_atime_ns, before.st_mtime_ns))
    hashed.clear()
    assert put(source, workspace)
    assert workspace / "a.img" in hashed
    assert (workspace / "a.img").read_bytes() == (source[0] / source[1][0].path).read_bytes()


def test_a_seal_counts_only_for_a_file_changed_before_it_was_written(source, hashed, tmp_path):
    """A change within the clock's tick of the seal leaves the file's times as they were: such a
    seal (written no later than the file's last change) is not trusted."""
    workspace = tmp_path / "copy"
    assert put(source, workspace)
    changed = (workspace / "a.img").lstat().st_ctime_ns
    os.utime(workspace / SEALS / "a.img", ns=(changed, changed))
    hashed.clear()
    assert put(source, workspace)
    assert hashed == [workspace / "a.img"]


def test_a_seal_of_another_file_is_not_trusted(source, hashed, tmp_path):
    """A seal names the file's hash in the manifest and the copy's inode: a copy replaced by another
    file, or a manifest entry of other bytes, is hashed again."""
    workspace = tmp_path / "copy"
    assert put(source, workspace)
    replacement = workspace / "a.img.new"
    replacement.write_bytes(os.urandom(300_000))
    os.replace(replacement, workspace / "a.img")
    hashed.clear()
    assert put(source, workspace)
    assert workspace / "a.img" in hashed
    assert (workspace / "a.img").read_bytes() == (source[0] / source[1][0].path).read_bytes()
    folder, entries = source  # the checkpoint's file and its manifest entry changed: the sealed copy is not it
    new = os.urandom(300_000)
    (folder / entries[0].path).write_bytes(new)
    entries[0] = CopiedFile(entries[0].path, len(new), hash_file(folder / entries[0].path))
    hashed.clear()
    assert put(source, workspace)
    assert workspace / "a.img" in hashed and (workspace / "a.img").read_bytes() == new


@pytest.mark.parametrize("size", [0, 1, 4096, 10 * 4096 + 17])
def test_a_copy_is_hashed_as_it_is_written(tmp_path, monkeypatch, size):
    """One read of the source: chunks copied by several threads, hashed in order."""
    monkeypatch.setattr(presharded.manifest, "COPY_CHUNK", 4096)
    source, target = tmp_path / "source", tmp_path / "target"
    source.write_bytes(os.urandom(size))
    target.write_bytes(b"x" * (size + 5000))  # a longer file there before: overwritten, not kept
    assert copy_hashed(source, target, threads=3) == hash_file(source)
    assert target.read_bytes() == source.read_bytes()
