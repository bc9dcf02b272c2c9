"""Read this node's rank files into the page cache in the background while
vLLM imports (seconds of Python), so that the loader finds them warm.

The kernel reads them into the page cache and hands them to /dev/null
(`sendfile`, a chunk at a time): nothing is copied into this process and the
page cache holds the only copy; files already cached cost next to nothing.
(`posix_fadvise(WILLNEED)` read 8 MiB of a 64 MiB file here: dev/willneed.py.) Skipped
when the files do not fit in the memory available."""

import ctypes
import mmap
import os
import sys
import threading
from pathlib import Path

CHUNK = 64 * 2**20


def available_memory() -> int:
    for line in Path("/proc/meminfo").read_text().splitlines():
        if line.startswith("MemAvailable:"):
            return int(line.split()[1]) * 1024
    return 0


def read_ahead(paths: list[Path]) -> threading.Thread | None:
    """The background read of `paths`, started; None when they would not fit."""
    need, room = sum(p.stat().st_size for p in paths), available_memory()
    if need > 0.9 * room:
        print(f"warning: not reading the weights ahead: {need / 1e9:.1f} GB do not fit in the "
              f"{room / 1e9:.1f} GB of memory available", file=sys.stderr)
        return None
    thread = threading.Thread(target=_read_ahead, args=(paths,), name="presharded-prefetch", daemon=True)
    thread.start()
    return thread


def _read_ahead(paths: list[Path]) -> None:
    null = os.open(os.devnull, os.O_WRONLY)
    try:
        for path in paths:
            fd = os.open(path, os.O_RDONLY)
            try:
                offset, size = 0, os.fstat(fd).st_size
                while offset < size and (sent := os.sendfile(null, fd, offset, min(CHUNK, size - offset))):
                    offset += sent
            finally:
                os.close(fd)
    finally:
        os.close(null)


def cached_fraction(path) -> float:
    """How much of `path` is in the page cache (mincore)."""
    libc = ctypes.CDLL(None, use_errno=True)
    libc.mmap.restype = ctypes.c_void_p
    libc.mmap.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int, ctypes.c_int, ctypes.c_int, ctypes.c_long]
    size = path.stat().st_size
    pages = (size + mmap.PAGESIZE - 1) // mmap.PAGESIZE
    vec = (ctypes.c_ubyte * pages)()
    fd = os.open(path, os.O_RDONLY)
    address = libc.mmap(None, size, mmap.PROT_READ, mmap.MAP_SHARED, fd, 0)
    try:
        assert libc.mincore(ctypes.c_void_p(address), ctypes.c_size_t(size), vec) == 0, ctypes.get_errno()
    finally:
        libc.munmap(ctypes.c_void_p(address), ctypes.c_size_t(size))
        os.close(fd)
    return sum(b & 1 for b in vec) / pages
