"""How a checkpoint appears in its output folder only once it is complete:
one save at a time to an output, written into a staging folder of its own
beside it, and moved into place last."""

import fcntl
import glob
import os
import secrets
import shutil
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from presharded.errors import UserError
from presharded.workspace import open_lock
from presharded.save_messages import why_save_failed
from presharded.shutdown import on_stuck_interrupt

# Present in a staging folder until the save has finished; no load accepts it.
UNFINISHED_MARKER = ".presharded-unfinished"


def _beside(output: Path, suffix: str) -> Path:
    return output.parent / f".{output.name}.presharded-{suffix}"


def _lock_name(node: int) -> str:
    return "lock" if node == 0 else f"lock-node{node}"  # the nodes of one save may share a folder


@contextmanager
def output_locked(output: Path, node: int = 0) -> Iterator[None]:
    """One save at a time to one output: a lock file beside it, held until the
    block ends (the kernel releases it even after kill -9); a second save is
    refused at once."""
    lock = _beside(output, _lock_name(node))
    fd = _lock(lock, output)
    on_stuck_interrupt(lambda: _unlock(lock, fd))
    try:
        yield
    finally:
        _unlock(lock, fd)


def _lock(path: Path, output: Path) -> int:
    while True:
        try:
            path.parent.mkdir(parents=True, exist_ok=True)
        except OSError as e:
            raise UserError(f"cannot write {e.filename} ({e.strerror}); choose an --output you can write to")
        fd = open_lock(path)  # never through a link: the output's folder may be shared (/tmp)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = os.pread(fd, 32, 0).decode(errors="replace").strip() or "?"
            os.close(fd)
            raise UserError(f"another save to {output} is running (pid {holder}); "
                            "wait for it to end, or choose another --output")
        try:
            if os.stat(path).st_ino == os.fstat(fd).st_ino:  # not removed by its last holder meanwhile
                os.ftruncate(fd, 0)
                os.pwrite(fd, f"{os.getpid()}\n".encode(), 0)
                return fd
        except FileNotFoundError:
            pass
        os.close(fd)


def _unlock(path: Path, fd: int) -> None:
    path.unlink(missing_ok=True)
    os.close(fd)


def staging_folders(output: Path, node: int | None = None) -> list[Path]:
    """The staging folders of saves to `output` (of one node's part of them):
    the one under way, or what interrupted ones left."""
    nodes = "*" if node is None else node
    return sorted(output.parent.glob(f".{glob.escape(output.name)}.presharded-staging-node{nodes}-*"))


@contextmanager
def staging_for(output: Path, node: int = 0) -> Iterator[Path]:
    """A new staging folder of this save's own, beside `output` (so the final
    move is a rename on one filesystem), marked unfinished. Use with the
    output locked: what interrupted saves left there is removed first. If
    the block fails, the folder goes, and a failure to write files becomes
    one line."""
    for left in staging_folders(output, node):
        shutil.rmtree(left, ignore_errors=True)
    try:
        staging = _beside(output, f"staging-node{node}-{os.getpid()}-{secrets.token_hex(4)}")
        staging.mkdir()
        (staging / UNFINISHED_MARKER).touch()
    except OSError as e:
        raise UserError(f"cannot write {e.filename} ({e.strerror}); choose an --output you can write to")
    on_stuck_interrupt(lambda: shutil.rmtree(staging, ignore_errors=True))
    try:
        yield staging
    except BaseException as e:
        reason = why_save_failed(staging, e)
        shutil.rmtree(staging, ignore_errors=True)
        if reason:
            raise UserError(f"{reason}; nothing was saved: free space or choose another --output") from None
        raise
    shutil.rmtree(staging, ignore_errors=True)  # unless published: a node whose files the driver took


def publish(staging: Path, output: Path) -> None:
    """Move a finished staging folder to `output`, replacing what was there
    only now that the new checkpoint is complete."""
    (staging / UNFINISHED_MARKER).unlink()
    old = _beside(output, "old")
    shutil.rmtree(old, ignore_errors=True)
    if output.exists():
        os.replace(output, old)
    os.replace(staging, output)
    shutil.rmtree(old, ignore_errors=True)
