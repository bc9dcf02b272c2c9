"""How fast a snapshot's image is copied into memory from a cold disk, hashed as it is copied, against
`cat` of the same files; each from a page cache written back, dropped and checked (mincore), taking
turns. `copy_hashed` is presharded.manifest's (8 threads, each chunk a new `bytes` read through the page
cache); `direct` is the variant tried on 2026-12-06 and not kept: O_DIRECT reads into reused aligned
buffers, by 4, 8 and 16 threads. Root only.

    python dev/image_copy.py CHECKPOINT --threads 4,8,16 --repeats 2 > image-copy.json
"""

import argparse
import itertools
import json
import mmap
import os
import queue
import shutil
import subprocess
import sys
import time
from collections import deque
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import blake3

from presharded.bench import resident_pages
from presharded.manifest import COPY_CHUNK, copy_hashed, read_manifest

ALIGN = 4096  # O_DIRECT's alignment of offsets, lengths and buffers


def cold(files: list[Path]) -> None:
    os.sync()
    Path("/proc/sys/vm/drop_caches").write_text("3")
    resident, total = resident_pages(files)
    assert resident == 0, f"{resident} of {total} pages still cached"


def direct(source: Path, target: Path, threads: int = 8) -> str:
    """O_DIRECT reads into page-aligned buffers used again and again, written and hashed in order."""
    hasher = blake3.blake3(max_threads=blake3.blake3.AUTO)
    fd = os.open(source, os.O_RDONLY | os.O_DIRECT)
    size = os.fstat(fd).st_size
    free: queue.SimpleQueue = queue.SimpleQueue()
    buffers = [mmap.mmap(-1, COPY_CHUNK) for _ in range(2 * threads + 1)]
    for buffer in buffers:
        buffer.madvise(mmap.MADV_HUGEPAGE)
        free.put(buffer)
    with open(target, "wb") as dst:

        def copy(offset: int) -> tuple[mmap.mmap, int]:
            buffer, n = free.get(), min(COPY_CHUNK, size - offset)
            view, got = memoryview(buffer)[: -(-n // ALIGN) * ALIGN], 0
            while got < n:
                if not (k := os.preadv(fd, [view[got:]], offset + got)):
                    raise OSError(f"{source} ended at byte {offset + got}")
                got += k
            os.pwrite(dst.fileno(), memoryview(buffer)[:n], offset)
            return buffer, n

        offsets = iter(range(0, size, COPY_CHUNK))
        with ThreadPoolExecutor(threads) as pool:
            ahead = deque(pool.submit(copy, offset) for offset in itertools.islice(offsets, 2 * threads))
            while ahead:
                buffer, n = ahead.popleft().result()
                if (offset := next(offsets, None)) is not None:
                    ahead.append(pool.submit(copy, offset))
                hasher.update(memoryview(buffer)[:n])
                free.put(buffer)
    os.close(fd)
    return hasher.hexdigest()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("checkpoint", type=Path)
    parser.add_argument("--threads", type=lambda s: [int(x) for x in s.split(",")], default=[4, 8, 16])
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--into", type=Path, default=Path("/dev/shm/image-copy"))
    args = parser.parse_args()
    manifest = read_manifest(args.checkpoint)
    files = [args.checkpoint / e.path for entries in manifest.snapshots.values() for e in entries
             if "/weights/" not in e.path and "/compiled/" not in e.path]
    size = sum(f.stat().st_size for f in files)
    ways = [("cat", None, 0), ("copy_hashed", copy_hashed, 8)] + [("direct", direct, t) for t in args.threads]
    rows = []
    for repeat in range(args.repeats):
        for how, copy, threads in ways:
            cold(files)
            args.into.mkdir(parents=True, exist_ok=True)
            start = time.perf_counter()
            if copy is None:
                subprocess.run(["cat", *map(str, files)], stdout=subprocess.DEVNULL, check=True)
            else:
                for f in files:
                    copy(f, args.into / f.name, threads)
            seconds = time.perf_counter() - start
            shutil.rmtree(args.into)
            rows.append({"repeat": repeat, "how": how, "threads": threads, "seconds": round(seconds, 3),
                         "gbps": round(size / seconds / 1e9, 3)})
            print(json.dumps(rows[-1]), file=sys.stderr)
    print(json.dumps({"bytes": size, "files": len(files), "rows": rows}))


if __name__ == "__main__":
    main()
