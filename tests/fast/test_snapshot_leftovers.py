"""A snapshot's compiled code goes into the workspace's caches only when the restore is about to
happen, and is taken out again when it does not: nothing that only a trusted snapshot was allowed
to run is left for a later start to use (presharded/snapshot_restore.py)."""

import json
import os
import shutil
import sys

import pytest

from presharded import snapshot_restore, snapshot_sets
from presharded.workspace import SEALS
from presharded.manifest import CopiedFile, hash_file, read_manifest, write_manifest


@pytest.fixture
def with_snapshot(files_only, tmp_path, monkeypatch):
    """A copy of a checkpoint with a snapshot set for this machine: its image, and two compiled files."""
    ckpt = shutil.copytree(files_only(1, 1), tmp_path / "ckpt")
    manifest = read_manifest(ckpt)
    name = snapshot_sets.set_name([], 1, 1)
    files = {"snapshot.json": json.dumps({"python": os.path.realpath(sys.executable)}).encode(),
             "pages-1.img": os.urandom(4096), "workspace/inductor/a.py": b"# a\n", "workspace/inductor/b.py": b"# b\n"}
    for relative, data in files.items():
        (ckpt / "snapshots" / name / relative).parent.mkdir(parents=True, exist_ok=True)
        (ckpt / "snapshots" / name / relative).write_bytes(data)
    manifest.snapshots[name] = [CopiedFile(f"snapshots/{name}/{r}", len(d), hash_file(ckpt / "snapshots" / name / r))
                                for r, d in files.items()]
    write_manifest(ckpt, manifest)
    monkeypatch.setattr(snapshot_restore, "IMAGES", tmp_path / "shm")
    monkeypatch.setattr(snapshot_restore, "WORKSPACE", tmp_path / "workspace")
    return ckpt, manifest, tmp_path / "workspace" / manifest.id


def compiled_in(workspace) -> list[str]:
    return sorted(p.name for p in (workspace / "inductor").glob("*")) if (workspace / "inductor").exists() else []


def test_a_snapshot_that_cannot_run_here_puts_no_code_in_the_workspace(with_snapshot, monkeypatch):
    ckpt, manifest, workspace = with_snapshot
    monkeypatch.setattr(snapshot_restore, "unsupported", lambda *args: "criu not found on PATH")
    status = snapshot_restore.Restore()
    assert snapshot_restore.ready_image(ckpt, manifest, [], True, status, False) is None
    assert status.reason == "criu not found on PATH" and compiled_in(workspace) == []


def test_a_damaged_compiled_file_takes_back_what_was_put_in_place(with_snapshot, monkeypatch):
    ckpt, manifest, workspace = with_snapshot
    monkeypatch.setattr(snapshot_restore, "unsupported", lambda *args: None)  # as where CRIU runs
    name = next(iter(manifest.snapshots))
    (ckpt / "snapshots" / name / "workspace/inductor/b.py").write_bytes(b"# c\n")  # same size, other bytes
    status = snapshot_restore.Restore()
    assert snapshot_restore.ready_image(ckpt, manifest, [], True, status, False) is None
    assert "damaged" in status.reason and compiled_in(workspace) == []
    assert not list((workspace / SEALS).rglob("*.py"))
    (ckpt / "snapshots" / name / "workspace/inductor/b.py").write_bytes(b"# b\n")  # the control: whole, in place
    assert snapshot_restore.ready_image(ckpt, manifest, [], True, snapshot_restore.Restore(), False) is not None
    assert compiled_in(workspace) == ["a.py", "b.py"]
    snapshot_restore.take_back(snapshot_restore.Restore(set=name), manifest, workspace)  # what a failed restore does
    assert compiled_in(workspace) == []
