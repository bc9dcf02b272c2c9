"""What a snapshot does to the processes it dumps, short of CRIU (which CI
cannot run): the tree it finds, the named semaphores it unlinks so that
CRIU keeps them in the image, the tree it kills."""

import os
import subprocess
import threading
import sys
import time
from pathlib import Path

from presharded.processes import holds_gpu, kill_tree, tree
from presharded.snapshot import unlink_shared_files

HOLDER = """
import multiprocessing, subprocess, sys, time
lock = multiprocessing.get_context("spawn").Lock()  # a named POSIX semaphore, kept under its name
child = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
print(child.pid, flush=True)
lock.acquire(); lock.release()
sys.stdin.readline()  # until the test says so
lock.acquire(); lock.release()  # still a working semaphore, its name gone
print("still works", flush=True)
time.sleep(60)
"""


def semaphores() -> set[str]:
    return {p.name for p in Path("/dev/shm").glob("sem.*")}


def test_a_trees_named_semaphores_are_unlinked_and_still_work():
    before = semaphores()
    proc = subprocess.Popen([sys.executable, "-c", HOLDER], stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
    try:
        child = int(proc.stdout.readline())
        assert tree(proc.pid)[:1] == [proc.pid] and child in tree(proc.pid)
        assert not holds_gpu(proc.pid)
        named = semaphores() - before
        assert named, "the spawn context's lock has a name in /dev/shm"
        unlink_shared_files(tree(proc.pid))
        assert not named & semaphores()
        proc.stdin.write("\n")
        proc.stdin.flush()
        assert proc.stdout.readline().strip() == "still works"
    finally:
        pids = tree(proc.pid)
        kill_tree(proc.pid)
        proc.wait(timeout=10)
    time.sleep(0.2)
    assert not [pid for pid in pids[1:] if os.path.exists(f"/proc/{pid}") and "Z" not in status(pid)]


def status(pid: int) -> str:
    try:
        return next(line for line in Path(f"/proc/{pid}/status").read_text().splitlines() if line.startswith("State"))
    except (OSError, StopIteration):
        return "Z"


def test_the_gpu_processes_pids_are_taken_before_the_dump_ends_them(tmp_path, monkeypatch):
    """A dump ends the processes it writes: their PIDs inside the namespace (which a restore gives them
    again, and cuda-checkpoint is pointed at) must be read while they run. Seen on an H100: read after
    the dump, they were None, and every restore fell back to a normal start."""
    from presharded import snapshot
    from presharded.snapshot_inbox import READY, put

    alive = {101, 102}
    calls = []

    def tool(path, *args, log=None):
        calls.append(args[0])
        if args[0] == "dump":
            alive.clear()
        return 0.1

    monkeypatch.setattr(snapshot, "tree", lambda pid: [pid, 101, 102] if pid == 100 else [101, 102])
    monkeypatch.setattr(snapshot, "holds_gpu", lambda pid: pid == 102)
    monkeypatch.setattr(snapshot, "ns_pid", lambda pid: {101: 1, 102: 7}[pid] if pid in alive else None)
    monkeypatch.setattr(snapshot, "tool", tool)
    monkeypatch.setattr(snapshot, "unlink_shared_files", lambda pids: None)
    monkeypatch.setattr(snapshot.shutil, "which", lambda name: name)
    put(tmp_path / READY, {"tokens": [], "asleep_gib": [], "kept_bytes": 0, "start_seconds": 1.0})

    class Engine:
        pid = 100

        def poll(self):
            return None

        def wait(self, timeout=None):
            return 0

    ready, cuda_pids, seconds = snapshot.dump(Engine(), threading.Event(), tmp_path, tmp_path / "new")
    assert cuda_pids == [7] and calls == ["--toggle", "dump"] and set(seconds) == {"cuda_checkpoint", "dump"}
