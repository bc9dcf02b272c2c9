"""What a snapshot does to the processes it dumps, short of CRIU (which CI
cannot run): the tree it finds, the named semaphores it unlinks so that
CRIU keeps them in the image, the tree it kills."""

import os
import subprocess
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
