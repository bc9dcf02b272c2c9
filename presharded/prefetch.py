"""Read this node's rank files into the page cache in the background while
vLLM imports (seconds of Python), so that the loader finds them warm.

The kernel reads them into the page cache and hands them to /dev/null
(`sendfile`, a chunk at a time): nothing is copied into this process and the
page cache holds the only copy; files already cached cost next to nothing.
(`posix_fadvise(WILLNEED)` read 8 MiB of a 64 MiB file here: dev/willneed.py.) Skipped
when the files do not fit in the memory available. The same for the parts of
files that a snapshot's process held in memory (`read_ranges`), before it is
restored."""

import ctypes
import mmap
import os
import stat
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
                send(null, fd, 0, os.fstat(fd).st_size)
            finally:
                os.close(fd)
    finally:
        os.close(null)


def send(null: int, fd: int, offset: int, end: int) -> int:
    """Bytes [offset, end) of `fd` through the page cache to /dev/null (`null`); how many there were."""
    start = offset
    while offset < end and (sent := os.sendfile(null, fd, offset, min(CHUNK, end - offset))):
        offset += sent
    return offset - start


def read_ranges(ranges: object, limit: int = 4 * 2**30) -> int:
    """The parts of files that `ranges` names ({path: [[offset, length], ...]}, as
    presharded.processes.mapped_pages gives them) read into the page cache, file by file, `limit` bytes
    at most; anything but an absolute path of a regular file with whole numbers is passed over. The
    bytes read."""
    done = 0
    if not isinstance(ranges, dict):
        return done
    null = os.open(os.devnull, os.O_WRONLY)
    try:
        for path, parts in ranges.items():
            if not (isinstance(path, str) and os.path.isabs(path) and isinstance(parts, list)):
                continue
            try:
                fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK)
            except OSError:
                continue
            try:
                if not stat.S_ISREG(os.fstat(fd).st_mode):
                    continue
                for part in parts:
                    if (isinstance(part, list) and len(part) == 2 and all(type(n) is int and n >= 0 for n in part)
                            and done < limit):
                        done += send(null, fd, part[0], part[0] + min(part[1], limit - done))
            finally:
                os.close(fd)
    finally:
        os.close(null)
    return done


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
