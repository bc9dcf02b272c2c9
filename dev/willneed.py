"""How much of a file `posix_fadvise(WILLNEED)` puts in the page cache on
this machine: why `--prefetch` reads with sendfile instead (dev/notebook.md,
section 7). A 64 MiB file, flushed and dropped from the page cache, then
WILLNEED over all of it, a pause, and mincore; five times.

    .venv/bin/python dev/willneed.py /var/tmp
"""

import os
import sys
import time
from pathlib import Path

from presharded.prefetch import cached_fraction

path = Path(sys.argv[1]) / "willneed.tmp"
path.write_bytes(os.urandom(64 * 2**20))
try:
    for attempt in range(5):
        fd = os.open(path, os.O_RDONLY)
        os.fsync(fd)
        os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
        dropped = cached_fraction(path)
        os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_WILLNEED)
        time.sleep(1.0)
        print(f"dropped: {dropped:.1%} cached; 1 s after WILLNEED: {cached_fraction(path):.1%}", flush=True)
        os.close(fd)
finally:
    path.unlink()
