"""What the engine process's memory in a CRIU image holds (issue 38: the warm restore is mostly CRIU putting
the engine's 1.4 GB of host memory back; dev/image_sizes.py says by mapping, 0.8 GB of it the heap).

- glibc's main heap walked chunk by chunk: the bytes in use and free, by chunk size;
- every dumped page scanned for what is recognisable: ELF images (CUDA's cubins are e_machine 190),
  CUDA fat binaries (magic 0xBA55ED50), PTX text; by mapping;
- the largest chunks in use, with their first bytes.

    python3 dev/heap_contents.py CKPT/snapshots/SET [--pid N] [--top 20]

Reads the images with presharded/criu_pages.py's reader (CRIU 4.2's field numbers), like dev/image_sizes.py.
"""

import argparse
import mmap
import re
import struct
from bisect import bisect_right
from collections import Counter
from pathlib import Path

from presharded.criu_pages import MM_MAGIC, PAGEMAP_MAGIC, parse, present, read_image

PAGE = 4096
HEAP = 1 << 5  # vma_entry.status
ELF = re.compile(rb"\x7fELF\x02\x01\x01")
FATBIN = re.compile(rb"\x50\xed\x55\xba\x01\x00")  # fatbin wrapper magic, version 1
PTX = re.compile(rb"\.version \d+\.\d+\s+\.target sm_")


class Memory:
    """A process's dumped pages, read by address (a page not in the image reads as zeros)."""

    def __init__(self, image: Path, pid: int):
        head, *entries = read_image(image / f"pagemap-{pid}.img", PAGEMAP_MAGIC)
        pages_id = dict((n, v) for n, _, v in parse(head))[1]
        self.file = open(image / f"pages-{pages_id}.img", "rb")
        self.data = mmap.mmap(self.file.fileno(), 0, prot=mmap.PROT_READ)
        self.runs, at = [], 0  # (address, pages, offset in the page file)
        for raw in entries:
            entry = dict((n, v) for n, _, v in parse(raw))
            count = entry.get(5, entry.get(2, 0))
            if present(entry):
                self.runs.append((entry[1], count, at))
                at += count * PAGE
        self.starts = [r[0] for r in self.runs]

    def read(self, address: int, size: int) -> bytes:
        out = bytearray(size)
        end = address + size
        i = max(bisect_right(self.starts, address) - 1, 0)
        while i < len(self.runs) and self.runs[i][0] < end:
            start, count, offset = self.runs[i]
            lo, hi = max(start, address), min(start + count * PAGE, end)
            if lo < hi:
                out[lo - address:hi - address] = self.data[offset + lo - start:offset + hi - start]
            i += 1
        return bytes(out)


def vmas(image: Path, pid: int) -> list[dict]:
    return sorted((dict((n, v) for n, _, v in parse(raw)) for n, _, raw in parse(read_image(image / f"mm-{pid}.img",
                   MM_MAGIC)[0]) if n == 14), key=lambda v: v[1])


def kind(head: bytes) -> str:
    if head.startswith(b"\x7fELF"):
        return f"ELF machine {struct.unpack_from('<H', head, 18)[0]}"
    if head.startswith(b"\x50\xed\x55\xba"):
        return "fatbin"
    if not any(head):
        return "zeros"
    printable = sum(32 <= b < 127 or b in (9, 10) for b in head)
    return "text" if printable > 0.9 * len(head) else "binary"


def walk_heap(memory: Memory, start: int, end: int) -> list[tuple[int, int, bool]]:
    """glibc's main-arena chunks from the heap's start: (address of the user data, size, in use)."""
    chunks, at = [], start
    while at + 16 <= end:
        size = struct.unpack("<Q", memory.read(at + 8, 8))[0] & ~7
        if size < 32 or at + size > end:
            break
        nxt = at + size
        in_use = nxt + 16 <= end and bool(struct.unpack("<Q", memory.read(nxt + 8, 8))[0] & 1)  # the last: top
        chunks.append((at + 16, size, in_use))
        at = nxt
    return chunks


def scan(memory: Memory, by_address) -> tuple[Counter, Counter]:
    """Bytes of ELF images (by machine) and fat binaries found in the dumped pages, by mapping."""
    found, count = Counter(), Counter()
    for start, pages, offset in memory.runs:
        data = memory.data[offset:offset + pages * PAGE]
        where = by_address(start)
        for m in ELF.finditer(data):
            h = memory.read(start + m.start(), 64)
            machine, shoff, shentsize, shnum = (struct.unpack_from("<H", h, 18)[0], struct.unpack_from("<Q", h, 40)[0],
                                                *struct.unpack_from("<HH", h, 58))
            size = shoff + shentsize * shnum
            if 0 < size < 2**31:
                found[(f"ELF machine {machine}", where)] += size
                count[(f"ELF machine {machine}", where)] += 1
        for m in FATBIN.finditer(data):
            header_size, fat_size = struct.unpack_from("<HQ", memory.read(start + m.start() + 6, 10))
            if fat_size < 2**31:
                found[("fatbin", where)] += header_size + fat_size
                count[("fatbin", where)] += 1
        for m in PTX.finditer(data):
            count[("PTX text", where)] += 1
    return found, count


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("image", type=Path)
    parser.add_argument("--pid", type=int, help="the process (the one with most pages by default)")
    parser.add_argument("--top", type=int, default=20)
    args = parser.parse_args()
    pid = args.pid or max((int(p.name[8:-4]) for p in args.image.glob("pagemap-*.img")),
                          key=lambda p: sum(r[1] for r in Memory(args.image, p).runs))
    memory, maps = Memory(args.image, pid), vmas(args.image, pid)
    starts = [v[1] for v in maps]

    def by_address(address: int) -> str:
        v = maps[bisect_right(starts, address) - 1]
        return "[heap]" if v.get(7, 0) & HEAP else f"{v[1]:#x}+{(v[2] - v[1]) >> 20}MiB"

    print(f"pid {pid}: {sum(r[1] for r in memory.runs) * PAGE / 2**20:.1f} MiB of pages")
    heap = next((v for v in maps if v.get(7, 0) & HEAP), None)
    if heap:
        chunks = walk_heap(memory, heap[1], heap[2])
        walked = sum(c[1] for c in chunks)
        print(f"\n[heap] {(heap[2] - heap[1]) / 2**20:.1f} MiB, walked {walked / 2**20:.1f} MiB in {len(chunks)} chunks: "
              f"in use {sum(c[1] for c in chunks if c[2]) / 2**20:.1f} MiB, "
              f"free {sum(c[1] for c in chunks if not c[2]) / 2**20:.1f} MiB")
        buckets, numbers = Counter(), Counter()
        for _, size, in_use in chunks:
            if in_use:
                bucket = next(b for b in (2**10, 2**14, 2**17, 2**20, 2**23, 2**25, 2**63) if size <= b)
                buckets[bucket] += size
                numbers[bucket] += 1
        for bucket, size in sorted(buckets.items()):
            print(f"  in use, chunks up to {bucket / 2**10:>10.0f} KiB: {size / 2**20:8.1f} MiB in {numbers[bucket]} chunks")
        kinds = Counter()
        for address, size, in_use in chunks:
            if in_use and size >= 2**16:
                kinds[kind(memory.read(address, 256))] += size
        print("  in use, chunks of 64 KiB or more, by their first bytes:",
              ", ".join(f"{k} {v / 2**20:.1f} MiB" for k, v in kinds.most_common()))
        print(f"  the {args.top} largest in use:")
        for address, size, _ in sorted((c for c in chunks if c[2]), key=lambda c: -c[1])[:args.top]:
            head = memory.read(address, 48)
            print(f"    {size / 2**20:8.2f} MiB at {address:#x}: {kind(memory.read(address, 256)):16} {head[:32].hex()} "
                  f"{head.decode('ascii', 'replace')[:32]!r}")
    found, count = scan(memory, by_address)
    print("\nrecognised in the dumped pages (bytes, count, mapping):")
    for (what, where), size in sorted(found.items(), key=lambda kv: -kv[1])[:args.top]:
        print(f"  {size / 2**20:8.1f} MiB {count[(what, where)]:6}  {what:16} {where}")
    for (what, where), n in count.items():
        if what == "PTX text":
            print(f"  PTX modules: {n} in {where}")


if __name__ == "__main__":
    main()
