"""A live process's memory written as CRIU would dump it, for dev/heap_contents.py and dev/image_sizes.py
where no CRIU runs or no snapshot is made: its mappings (`mm-PID.img`, with the heap, file and anonymous
flags CRIU sets), the present pages of every writable private mapping (/proc/PID/pagemap's bit 63), read
from /proc/PID/mem (`pagemap-PID.img`, `pages-1.img`), and the mapped files' names (`files.img`).
Device files' mappings (/dev/nvidia*) and shared memory are left out, as cuda-checkpoint and CRIU handle
them their own way.

    python3 dev/live_image.py PID OUT
"""

import argparse
import struct
import sys
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from heap_contents import FILE_PRIVATE, FILES_MAGIC, HEAP, PSTREE_MAGIC, REG  # noqa: E402
from presharded.criu_pages import (ANON_PRIVATE, BYTES, MM_MAGIC, PAGE, PAGEMAP_MAGIC, PE_PRESENT,  # noqa: E402
                                   VARINT, encode, image_bytes)

VMA_AREA_REGULAR = 1  # criu/include/image.h


def present_runs(pagemap, start: int, end: int) -> list[tuple[int, int]]:
    """(address, pages) of the present pages in [start, end)."""
    pagemap.seek(start // PAGE * 8)
    bits = np.frombuffer(pagemap.read((end - start) // PAGE * 8), dtype=np.uint64) >> np.uint64(63)
    edges = np.flatnonzero(np.diff(np.concatenate([[0], bits.astype(np.int8), [0]])))
    return [(start + int(a) * PAGE, int(b - a)) for a, b in zip(edges[::2], edges[1::2])]


def write_image(pid: int, out: Path) -> int:
    """The image of `pid` in `out`; the bytes of pages written."""
    out.mkdir(parents=True, exist_ok=True)
    vmas, entries, files = [], [encode([(1, VARINT, 1)])], {}
    written = 0
    with (open(f"/proc/{pid}/maps") as maps, open(f"/proc/{pid}/mem", "rb", buffering=0) as mem,
          open(f"/proc/{pid}/pagemap", "rb", buffering=0) as pagemap, open(out / "pages-1.img", "wb") as pages):
        for line in maps:
            parts = line.split(maxsplit=5)
            start, end = (int(x, 16) for x in parts[0].split("-"))
            perms, offset, path = parts[1], int(parts[2], 16), parts[5].strip() if len(parts) > 5 else ""
            if path.startswith(("[vvar", "[vdso", "[vsyscall", "/dev/", "/memfd:", "/SYSV")) or perms[3] == "s":
                continue
            status, shmid = VMA_AREA_REGULAR, 0
            if path.startswith("/"):
                status |= FILE_PRIVATE
                shmid = files.setdefault(path, len(files) + 1)
            else:
                status |= ANON_PRIVATE | (HEAP if path == "[heap]" else 0)
            vmas.append(encode([(1, VARINT, start), (2, VARINT, end), (3, VARINT, offset), (4, VARINT, shmid),
                                (5, VARINT, 3), (6, VARINT, 0x22), (7, VARINT, status), (8, VARINT, 1)]))
            if perms[0] != "r" or perms[1] != "w":
                continue
            for address, count in present_runs(pagemap, start, end):
                try:
                    mem.seek(address)
                    data = mem.read(count * PAGE)
                except OSError:
                    continue
                if len(data) != count * PAGE:
                    continue
                pages.write(data)
                written += len(data)
                entries.append(encode([(1, VARINT, address), (2, VARINT, 0), (4, VARINT, PE_PRESENT),
                                       (5, VARINT, count)]))
    (out / f"mm-{pid}.img").write_bytes(image_bytes(MM_MAGIC, [encode([(1, VARINT, 0)] + [(14, BYTES, v) for v in vmas])]))
    (out / f"pagemap-{pid}.img").write_bytes(image_bytes(PAGEMAP_MAGIC, entries))
    (out / "files.img").write_bytes(image_bytes(FILES_MAGIC, [
        encode([(1, VARINT, REG), (2, VARINT, i), (3, BYTES, encode([(1, VARINT, i), (6, BYTES, p.encode())]))])
        for p, i in files.items()]))
    (out / "pstree.img").write_bytes(image_bytes(PSTREE_MAGIC, [encode([(1, VARINT, pid)])]))
    return written


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("pid", type=int)
    parser.add_argument("out", type=Path)
    args = parser.parse_args()
    print(f"{write_image(args.pid, args.out) / 2**20:.1f} MiB of pages", file=sys.stderr)


if __name__ == "__main__":
    main()
