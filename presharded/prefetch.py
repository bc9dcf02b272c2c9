"""Read this node's rank files into the page cache in the background while
vLLM imports (seconds of Python), so that the loader finds them warm.

The kernel reads them into the page cache and hands them to /dev/null
(`sendfile`, a chunk at a time): nothing is copied into this process and the
page cache holds the only copy; files already cached cost next to nothing.
(`posix_fadvise(WILLNEED)` read 8 MiB of a 64 MiB file here: dev/willneed.py.) Skipped
when the files do not fit in the memory available."""

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


def start(paths: list[Path]) -> threading.Thread | None:
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
