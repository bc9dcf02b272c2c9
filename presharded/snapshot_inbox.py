"""How a command and its snapshotted engine talk: files in the checkpoint's
inbox, WORKSPACE/ID/snapshot/ (the same path in every process of this user).
The engine says it is ready to be dumped; restored, it reads the request
(prompt, sampling, where to log) and writes its answer (tokens, seconds)."""

import json
import os
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from presharded.errors import UserError
from presharded.manifest import Manifest
from presharded.snapshot_sets import IMAGES
from presharded.workspace import WORKSPACE, open_lock, private_folder

# The files of the inbox through which this command and the snapshotted engine talk: the engine says it
# is ready to be dumped; restored, it reads the request and says what it did (its output in ENGINE_LOG).
READY, REQUEST, DONE, ENGINE_LOG = "ready.json", "request.json", "done.json", "engine.log"
# What the engine asks of its workers (presharded/snapshot_worker.py), by name through collective_rpc.
ASLEEP, KEEP_WEIGHTS = "presharded_asleep", "presharded_keep"
RESTORED, REFILL = "presharded_restored", "presharded_refill"
KEEP = "keep.json"  # in the inbox while a snapshot is made: where the engine writes what it keeps (KEPT)


@contextmanager
def inbox(manifest: Manifest) -> Iterator[Path]:
    """WORKSPACE/ID/snapshot, emptied, for this process alone: one snapshot of the checkpoint is
    made or started at a time (the restored process finds its request at this one path)."""
    import fcntl

    root = private_folder(WORKSPACE)
    fd = open_lock(root / f"{manifest.id}.snapshot.lock")
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        box = private_folder(root / manifest.id / "snapshot")
        for old in box.iterdir():
            old.unlink()
        yield box
    finally:
        os.close(fd)


def rpc_folder() -> Path:
    """Where a server's engine sockets bind (VLLM_RPC_BASE_PATH): short (a socket's path holds 107
    bytes), this user's, emptied: a restore binds them again."""
    folder = private_folder(IMAGES / f"presharded-{os.getuid()}" / "rpc")
    for old in folder.iterdir():
        old.unlink()
    return folder


def own_session() -> None:
    """The snapshotted process, as init of its namespace, leads a session of its own: CRIU dumps
    no session whose leader is outside the namespace."""
    if os.getpid() == 1:
        os.setsid()


def redirect(log: str | None) -> None:
    """This process's standard input and output to /dev/null (nothing of this machine's terminal or
    pipes goes into the image), or, restored, its output to `log`."""
    fd = os.open(log, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o600) if log else os.open(os.devnull, os.O_RDWR)
    for target in (0, 1, 2) if log is None else (1, 2):
        os.dup2(fd, target)
    os.close(fd)


def put(path: Path, data: dict) -> None:
    """`data` as JSON at `path`, in one step: a reader polling for it never sees half of it."""
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(json.dumps(data))
    os.replace(tmp, path)


def wait_for(path: Path, alive, timeout: float, what: str) -> dict:
    deadline = time.monotonic() + timeout
    while not path.exists():
        if not alive():
            raise UserError(f"{what} ended before it was ready (its messages are above)")
        if time.monotonic() > deadline:
            raise UserError(f"{what} was not ready within {timeout:.0f} s")
        time.sleep(0.005)
    return json.loads(path.read_text())
