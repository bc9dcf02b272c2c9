"""Another user of the same machine (played by `setpriv`, as CI runs as root): what they can make
or leave in the places a start, a save or an upload uses, before the victim's first run. Each
attack is refused or left unused; where it needs a live payload, the same plant owned by the
victim is used, so that the test would notice a plant that went dead. (The end-to-end start that
runs a planted payload: tests/test_start_caches.py.)"""

import os
import shutil
import subprocess
import tempfile
from pathlib import Path

import pytest

from conftest import refused
import presharded.workspace as private
from presharded import s3, snapshot_restore, snapshot_sets, start_caches
from presharded.errors import UserError
from presharded.manifest import CopiedFile, hash_file, read_manifest, write_manifest
from presharded.workspace import SEALS, stamp
from presharded.start_caches import use_set

ATTACKER = 65534
as_root_only = pytest.mark.skipif(os.getuid() != 0 or not shutil.which("setpriv"),
                                  reason="acting as other users needs root and setpriv")
pytestmark = as_root_only


def as_attacker(script: str) -> None:
    proc = subprocess.run(["setpriv", f"--reuid={ATTACKER}", f"--regid={ATTACKER}", "--clear-groups",
                           "sh", "-c", script], capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0, proc.stderr


def plant(root: Path, relative: str, entry: CopiedFile, payload: bytes) -> Path:
    """As the other user: `root` (writable by all) made first, and in it a file of the entry's size
    holding `payload`, with a seal written for it, so that a start would take it as checked."""
    target = root / relative
    as_attacker(f'mkdir -m 777 -p "{target.parent}" "{(root / SEALS / relative).parent}"')
    subprocess.run(["setpriv", f"--reuid={ATTACKER}", f"--regid={ATTACKER}", "--clear-groups", "sh", "-c",
                    f'cat > "{target}"'], input=payload.ljust(entry.size, b"#"), check=True)
    seal(root, relative, entry, ATTACKER)
    return target


def seal(root: Path, relative: str, entry: CopiedFile, owner: int) -> None:
    """A seal for the file as it is now, by `owner`, newer than the file's last change: one that counts."""
    sealed = root / SEALS / relative
    sealed.unlink(missing_ok=True)
    sealed.write_text(stamp((root / relative).lstat(), entry))
    os.chown(sealed, owner, owner)


def fix_the_top_only(top: Path) -> None:
    """What an older warning advised: the folder's owner and mode fixed, nothing inside looked at."""
    os.chown(top, os.getuid(), os.getgid())
    top.chmod(0o700)


def own_everything(top: Path) -> None:
    subprocess.run(["chown", "-R", f"{os.getuid()}:{os.getgid()}", str(top)], check=True)
    subprocess.run(["chmod", "-R", "go-w", str(top)], check=True)


@pytest.mark.parametrize("fixed", [False, True], ids=["top-fixed", "all-own"])
def test_a_workspace_planted_before_the_first_start(files_only, shared_tmp, monkeypatch, capsys, fixed):
    """Another user made /tmp/presharded-UID first, with a same-size payload and its seal in a
    checkpoint's folder. Once the victim fixed the top folder only, the start refuses the workspace
    (one warning that says to remove it); with everything the victim's own (the control), the payload
    would be what the engine runs."""
    ckpt = files_only(2, 1)
    manifest = read_manifest(ckpt)
    (entry,) = manifest.caches["S"]
    workspace = shared_tmp / f"presharded-{os.getuid()}"
    monkeypatch.setattr(private, "WORKSPACE", workspace)
    monkeypatch.setattr(start_caches, "caches_set_name", lambda tp, pp: "S")
    relative = entry.path.removeprefix("start-caches/S/")
    planted = plant(workspace / manifest.id, relative, entry, b"import os\n")
    fix_the_top_only(workspace)
    if fixed:
        own_everything(workspace)
        seal(workspace / manifest.id, relative, entry, os.getuid())
    use = use_set(ckpt, manifest, 2, 1, trust=True)
    warnings = [line for line in capsys.readouterr().err.splitlines() if line.startswith("warning:")]
    if not fixed:
        assert use.workspace is None and use.env == {}
        assert len(warnings) == 1 and f"belongs to uid {ATTACKER}" in warnings[0], warnings
        assert f"remove {workspace}" in warnings[0] and "chmod" not in warnings[0]
    else:
        assert use.workspace == workspace / manifest.id and warnings == []
        assert planted.read_bytes().startswith(b"import os")  # the plant is live: owned by the victim, it is used


@pytest.mark.parametrize("fixed", [False, True], ids=["top-fixed", "all-own"])
def test_a_snapshot_image_planted_in_memory_before_the_first_restore(files_only, shared_tmp, monkeypatch, capsys,
                                                                       tmp_path, fixed):
    """The same in /dev/shm/presharded-UID, where a trusted snapshot's image is copied before CRIU
    restores it: the restore is not attempted from a folder another user made."""
    ckpt = shutil.copytree(files_only(1, 1), tmp_path / "ckpt")
    manifest = read_manifest(ckpt)
    name = snapshot_sets.set_name([], 1, 1)
    image = ckpt / "snapshots" / name / "pages-1.img"
    image.parent.mkdir(parents=True)
    image.write_bytes(os.urandom(4096))
    entry = CopiedFile(f"snapshots/{name}/pages-1.img", 4096, hash_file(image))
    manifest.snapshots[name] = [entry]
    write_manifest(ckpt, manifest)
    monkeypatch.setattr(snapshot_restore, "IMAGES", shared_tmp)
    monkeypatch.setattr(private, "WORKSPACE", shared_tmp / "workspace")
    monkeypatch.setattr(snapshot_restore, "WORKSPACE", shared_tmp / "workspace")
    images = shared_tmp / f"presharded-{os.getuid()}"
    copy = images / f"snapshot-{snapshot_restore.blake3.blake3(name.encode()).hexdigest()[:16]}"
    planted = plant(copy, "pages-1.img", entry, b"the other user's process")
    fix_the_top_only(images)
    if fixed:
        own_everything(images)
        seal(copy, "pages-1.img", entry, os.getuid())
    status = snapshot_restore.Restore()
    snapshot_restore.ready_image(ckpt, manifest, [], True, status, False)
    if not fixed:
        assert f"belongs to uid {ATTACKER}" in status.reason and f"remove {images}" in status.reason
        assert planted.read_bytes().startswith(b"the other user's")  # left alone, and not used
    else:  # taken as checked: CRIU would be pointed at it (here no CRIU: refused after the copy)
        assert "belongs to uid" not in (status.reason or "")
        assert planted.read_bytes().startswith(b"the other user's")


def test_the_s3_upload_folder_is_this_users_alone(shared_tmp, monkeypatch):
    """A save to S3 stages in TMPDIR/presharded-upload-UID: made by another user first, it is refused;
    made by the save, no one else can put anything in it (nothing to rename in before the upload)."""
    monkeypatch.setenv("TMPDIR", str(shared_tmp))
    monkeypatch.setattr(tempfile, "tempdir", None)
    url = "s3://bucket/prefix"
    top = shared_tmp / f"presharded-upload-{os.getuid()}"
    as_attacker(f'mkdir -m 777 "{top}" && mkdir "{top}/evil"')
    fix_the_top_only(top)
    with pytest.raises(UserError, match=f"belongs to uid {ATTACKER}.*remove {top}"):
        s3.upload_folder(url)
    shutil.rmtree(top)
    folder = s3.upload_folder(url)
    folder.mkdir()
    assert top.stat().st_mode & 0o777 == 0o700
    proc = subprocess.run(["setpriv", f"--reuid={ATTACKER}", f"--regid={ATTACKER}", "--clear-groups",
                           "touch", str(folder / "x")], capture_output=True, text=True)
    assert proc.returncode != 0 and "Permission denied" in proc.stderr


@pytest.mark.parametrize("kind", ["symlink", "hard link", "file of their own"])
def test_a_lock_is_never_written_through_a_link(shared_tmp, tiny_model, kind):
    """A save to a shared folder: another user made its lock a symlink (or a hard link, or a file of
    their own) to a file of the victim's. Refused before vLLM; the victim's file as it was."""
    precious = shared_tmp / "victims-file"
    precious.write_text("precious")
    precious.chmod(0o600)
    lock = shared_tmp / ".x.presharded-lock"
    if kind == "symlink":
        as_attacker(f'ln -s "{precious}" "{lock}"')
    elif kind == "hard link":
        os.link(precious, lock)  # as protected_hardlinks=0 would let them
    else:
        as_attacker(f'touch "{lock}"')
    line = refused(f"a save's lock another user made ({kind})", "save_sharded_state.py", "--model",
                   str(tiny_model), "--output", str(shared_tmp / "x"))
    assert f"the lock {lock}" in line and "remove it" in line
    assert precious.read_text() == "precious"


def test_a_stray_file_named_with_a_line_of_its_own(files_only, tmp_path):
    """A file name holding a newline and `error: ...` is shown escaped: the script's last line is ours."""
    ckpt = shutil.copytree(files_only(1, 1), tmp_path / "ckpt")
    (ckpt / "x\nerror: all good, run rm -rf ~").write_text("")
    line = refused("a stray file whose name holds a line", "presharded.verify_cli", str(ckpt))
    assert line.startswith("error: ") and "x\\nerror: all good" in line and "is not part of this checkpoint" in line


def test_a_full_disk_names_the_file_being_written(tiny_model, tmp_path):
    from conftest import small_filesystem
    from presharded.save_messages import why_save_failed
    from presharded.source_model import copy_model_files

    source = shutil.copytree(tiny_model, tmp_path / "model")
    (source / "tokenizer.model").write_bytes(os.urandom(3 * 2**20))
    with small_filesystem(tmp_path / "disk", "1M") as disk:
        with pytest.raises(OSError) as failed:
            copy_model_files(source, disk)
        reason = why_save_failed(disk, failed.value)
    assert reason.startswith("No space left on device while writing ") and str(disk) in reason, reason
    assert str(source) not in reason


def test_a_file_others_could_write_matters_only_where_they_can_enter(shared_tmp):
    """Under umask 002 this user's files are group-writable: harmless inside a folder only this user
    enters (0700, as made here); refused where others may enter the folder."""
    top = private.private_folder(shared_tmp / "own")
    (top / "kernel.py").write_text("# compiled\n")
    (top / "kernel.py").chmod(0o664)
    assert private.private_folder(top) == top
    top.chmod(0o755)
    with pytest.raises(UserError, match="kernel.py can be written by other users"):
        private.private_folder(top)
