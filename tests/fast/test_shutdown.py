"""The guard that ends an engine with its script removes what that engine left in /dev/shm, and nothing
another engine on the same machine is making there (a file made, not mapped yet)."""

import os
import subprocess
import sys
import time
from pathlib import Path

# An engine's process: maps a file of its own in /dev/shm, then ends without removing it, as a killed one does.
ENGINE = """
import mmap, os, sys
sys.stdin.readline()
fd = os.open(f"/dev/shm/{sys.argv[1]}", os.O_RDWR | os.O_CREAT, 0o600)
os.ftruncate(fd, 4096)
mapped = mmap.mmap(fd, 4096)
print("mapped", flush=True)
sys.stdin.readline()
os._exit(0)
"""


def watching(guard: subprocess.Popen) -> bool:
    """Whether the guard has noted /dev/shm and waits on its script (holds a pidfd)."""
    try:
        return any("pidfd" in os.readlink(link) for link in Path(f"/proc/{guard.pid}/fd").iterdir())
    except OSError:
        return False


def test_the_guard_removes_what_its_engine_left_and_nothing_else():
    mine, theirs = (Path(f"/dev/shm/psm_test_{os.getpid()}_{who}") for who in ("mine", "theirs"))
    engine = subprocess.Popen([sys.executable, "-c", ENGINE, mine.name], stdin=subprocess.PIPE,
                              stdout=subprocess.PIPE, text=True)
    guard = subprocess.Popen([sys.executable, "-m", "presharded.shutdown", str(engine.pid)])
    try:
        deadline = time.monotonic() + 30
        while not watching(guard):
            assert time.monotonic() < deadline and guard.poll() is None
            time.sleep(0.05)
        engine.stdin.write("\n")
        engine.stdin.flush()
        assert engine.stdout.readline() == "mapped\n"
        time.sleep(1.0)  # the guard looks every 0.5 s
        theirs.write_bytes(b"another engine's, not mapped yet")
        engine.stdin.write("\n")
        engine.stdin.flush()
        assert engine.wait(timeout=10) == 0
        assert guard.wait(timeout=30) == 0
        assert not mine.exists() and theirs.exists()
    finally:
        engine.kill()
        guard.kill()
        mine.unlink(missing_ok=True)
        theirs.unlink(missing_ok=True)
