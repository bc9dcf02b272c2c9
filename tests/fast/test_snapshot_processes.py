"""What a snapshot does to the processes it dumps, short of CRIU (which CI
cannot run): the tree it finds, the named semaphores it unlinks so that
CRIU keeps them in the image, the tree it kills, the parts of files it finds
them holding (which a restore reads ahead, untrusting what it is given)."""

import os
import subprocess
import threading
import sys
import time
from pathlib import Path

import pytest

from presharded.prefetch import cached_fraction, read_ranges
from presharded.processes import PAGE, holds_gpu, kill_tree, mapped_inodes, mapped_pages, tree
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


def semaphores(pids: list[int]) -> set[str]:
    """The named semaphores in /dev/shm that the processes `pids` map (the other lane's engines have their own)."""
    inodes = mapped_inodes(pids)
    return {p.name for p in Path("/dev/shm").glob("sem.*") if p.stat().st_ino in inodes}


def test_a_trees_named_semaphores_are_unlinked_and_still_work():
    proc = subprocess.Popen([sys.executable, "-c", HOLDER], stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
    try:
        child = int(proc.stdout.readline())
        assert tree(proc.pid)[:1] == [proc.pid] and child in tree(proc.pid)
        assert not holds_gpu(proc.pid)
        named = semaphores(tree(proc.pid))
        assert named, "the spawn context's lock has a name in /dev/shm"
        unlink_shared_files(tree(proc.pid))
        assert not named & {p.name for p in Path("/dev/shm").glob("sem.*")}
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

    ready, cuda_pids, mapped, seconds = snapshot.dump(Engine(), threading.Event(), tmp_path, tmp_path / "new")
    assert cuda_pids == [7] and calls == ["--toggle", "dump"] and set(seconds) == {"cuda_checkpoint", "dump"}


TOUCHER = """
import mmap, sys
with open(sys.argv[1], "rb") as f:
    view = mmap.mmap(f.fileno(), 0, prot=mmap.PROT_READ)
pages = [int(n) for n in sys.argv[2:]]
print(sum(view[n * mmap.PAGESIZE] for n in pages), flush=True)  # each page read once: faulted in
sys.stdin.readline()
"""


def uncached(path: Path) -> None:
    with open(path, "rb") as f:
        os.fsync(f.fileno())
        os.posix_fadvise(f.fileno(), 0, 0, os.POSIX_FADV_DONTNEED)
    if cached_fraction(path) > 0.01:
        pytest.skip("this file system keeps the file cached")


def test_the_pages_a_process_holds_of_a_file_are_found(tmp_path):
    """A process that read two pages of a mapped file far apart holds those (and what the kernel maps
    around a fault: 16 pages here), not the middle of the file; joined when `gap` allows. (A file still
    in the page cache, as just written, is mapped a large folio at a time, up to the whole of it.)"""
    lib = tmp_path / "lib.so"
    lib.write_bytes(os.urandom(512 * PAGE))
    uncached(lib)
    proc = subprocess.Popen([sys.executable, "-c", TOUCHER, str(lib), "3", "400"], stdin=subprocess.PIPE,
                            stdout=subprocess.PIPE, text=True)
    try:
        proc.stdout.readline()
        ranges = mapped_pages([proc.pid], gap=0)[str(lib)]
        held = {n for offset, length in ranges for n in range(offset // PAGE, (offset + length) // PAGE)}
        assert {3, 400} <= held and not held & set(range(100, 300)) and len(held) <= 2 * 32
        assert all(offset % PAGE == 0 and length % PAGE == 0 for offset, length in ranges)
        assert mapped_pages([proc.pid], gap=512 * PAGE)[str(lib)] == [[min(held) * PAGE, (max(held) + 1 - min(held)) * PAGE]]
        assert not any(path.startswith("/dev/") for path in mapped_pages([proc.pid]))
    finally:
        proc.kill()
        proc.wait()


def test_a_restore_reads_only_the_parts_of_regular_files_it_is_given(tmp_path):
    """The ranges come from the set's description: what is not an absolute path of a regular file with
    whole numbers is passed over (no error: reading ahead is only a hint), and `limit` holds."""
    data = tmp_path / "data"
    data.write_bytes(os.urandom(64 * 2**20))
    uncached(data)
    (tmp_path / "link").symlink_to(data)
    os.mkfifo(tmp_path / "fifo")
    hostile = {str(data): [[0, 2**20], [2**20, -5], [True, 4096], ["0", 4096], [4096], [2**40, 4096]],
               "relative/path": [[0, 4096]], str(tmp_path / "link"): [[0, 4096]], str(tmp_path / "fifo"): [[0, 4096]],
               str(tmp_path): [[0, 4096]], "/dev/zero": [[0, 4096]], str(tmp_path / "absent"): [[0, 4096]],
               str(tmp_path / "list"): "not a list"}
    assert read_ranges(hostile) == 2**20
    assert 1 / 64 <= cached_fraction(data) < 0.5
    assert read_ranges({str(data): [[0, 2**20], [2**20, 2**20]]}, limit=2**20 + 4096) == 2**20 + 4096
    assert read_ranges(None) == read_ranges([["/etc/passwd", [[0, 4096]]]]) == 0
