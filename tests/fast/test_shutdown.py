"""The guard that ends an engine with its script removes what that engine left in /dev/shm, also what it
made as it died (after the guard's last look), and nothing another engine on the same machine is making
there (a file made, not mapped yet)."""

import mmap
import os
import subprocess
import sys
import time
from pathlib import Path

# An engine's process: maps a file of its own in /dev/shm; told to, maps another and ends at once without
# removing either, as a killed one does (its workers die with it, files mapped a moment before included).
ENGINE = """
import mmap, os, sys

def make(name):
    fd = os.open(f"/dev/shm/{name}", os.O_RDWR | os.O_CREAT, 0o600)
    os.ftruncate(fd, 4096)
    return mmap.mmap(fd, 4096)

sys.stdin.readline()
mapped = make(sys.argv[1])
print("mapped", flush=True)
sys.stdin.readline()
late = make(sys.argv[2])
os._exit(0)
"""


def watching(guard: subprocess.Popen) -> bool:
    """Whether the guard has noted /dev/shm and waits on its script (holds a pidfd)."""
    try:
        return any("pidfd" in os.readlink(link) for link in Path(f"/proc/{guard.pid}/fd").iterdir())
    except OSError:
        return False


def test_the_guard_removes_what_its_engine_left_and_nothing_else():
    mine, late, theirs, fresh = (Path(f"/dev/shm/psm_test_{os.getpid()}_{who}")
                                 for who in ("mine", "late", "theirs", "fresh"))
    engine = subprocess.Popen([sys.executable, "-c", ENGINE, mine.name, late.name], stdin=subprocess.PIPE,
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
        theirs.write_bytes(b"another engine's, not mapped yet")
        time.sleep(1.0)  # the guard looks every 0.5 s: it has seen `theirs`, unmapped
        fresh.write_bytes(b"another engine's, made as this one ends")
        engine.stdin.write("\n")  # `late` made and mapped, then the engine ends: after the guard's last look
        engine.stdin.flush()
        assert engine.wait(timeout=10) == 0
        time.sleep(0.3)
        with open(fresh, "r+b") as f, mmap.mmap(f.fileno(), 0):  # the other engine maps it, as vLLM does at once
            assert guard.wait(timeout=30) == 0
        assert not mine.exists() and not late.exists()
        assert theirs.exists() and fresh.exists()
    finally:
        engine.kill()
        guard.kill()
        for path in (mine, late, theirs, fresh):
            path.unlink(missing_ok=True)
