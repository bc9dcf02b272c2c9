"""What the engine process's memory in a CRIU image holds (issue 38: the warm restore is mostly CRIU putting
the engine's 1.4 GB of host memory back; dev/image_sizes.py says by mapping, 0.8 GB of it the heap).

- glibc's main heap walked chunk by chunk: the bytes in use and free, by chunk size and by the sizes
  that hold most; the chunks in use by the Python type whose object they hold (the type pointer at +8,
  or at +24 behind a GC header; the type's name read from its object, and from its file where the image
  has not that page), else as a dict's keys table, an array of pointers to Python objects, or by the
  first library their first 64 bytes point into; the large ones by their first bytes (ELF, fat binary,
  text, zeros);
- every dumped page scanned for ELF images (CUDA's cubins are e_machine 190), CUDA fat binaries (magic
  0xBA55ED50) and PTX text, by mapping.

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

from presharded.criu_pages import MM_MAGIC, PAGE, PAGEMAP_MAGIC, parse, present, read_image

STACK, HEAP, FILE_PRIVATE, FILE_SHARED, ANON_SHARED = 1 << 1, 1 << 5, 1 << 6, 1 << 7, 1 << 8  # vma_entry.status
FILES_MAGIC, PSTREE_MAGIC, REG = 0x56303138, 0x50273030, 1  # criu/include/magic.h; file_entry.type
ELF = re.compile(rb"\x7fELF\x02\x01\x01")
FATBIN = re.compile(rb"\x50\xed\x55\xba\x01\x00")  # fatbin wrapper magic, version 1
PTX = re.compile(rb"\.version \d+\.\d+\s+\.target sm_")


def fields(raw: bytes) -> dict:
    return dict((n, v) for n, _, v in parse(raw))


class Memory:
    """A process's memory as its image has it: the dumped pages, and for a file mapping's page not dumped
    the file's bytes; anything else reads as zeros."""

    def __init__(self, image: Path, pid: int):
        head, *entries = read_image(image / f"pagemap-{pid}.img", PAGEMAP_MAGIC)
        self.file = open(image / f"pages-{fields(head)[1]}.img", "rb")
        size = Path(self.file.name).stat().st_size
        self.data = mmap.mmap(self.file.fileno(), 0, prot=mmap.PROT_READ) if size else b""
        self.runs, at = [], 0  # (address, pages, offset in the page file)
        for raw in entries:
            entry = fields(raw)
            count = entry.get(5, entry.get(2, 0))
            if present(entry):
                self.runs.append((entry[1], count, at))
                at += count * PAGE
        self.starts = [r[0] for r in self.runs]
        self.vmas = sorted((fields(raw) for n, _, raw in parse(read_image(image / f"mm-{pid}.img", MM_MAGIC)[0])
                            if n == 14), key=lambda v: v[1])
        self.vma_starts = [v[1] for v in self.vmas]
        try:
            self.paths = {e[2]: fields(e[3])[6].decode(errors="replace")
                          for e in map(fields, read_image(image / "files.img", FILES_MAGIC)) if e.get(1) == REG and 3 in e}
        except (OSError, ValueError, KeyError):
            self.paths = {}

    def vma(self, address: int) -> dict | None:
        i = bisect_right(self.vma_starts, address) - 1
        return self.vmas[i] if i >= 0 and address < self.vmas[i][2] else None

    def where(self, address: int) -> str:
        v = self.vma(address)
        if v is None:
            return "outside"
        status = v.get(7, 0)
        if status & (FILE_PRIVATE | FILE_SHARED):
            return Path(self.paths.get(v.get(4), f"file {v.get(4)}")).name
        if status & (HEAP | STACK):
            return "[heap]" if status & HEAP else "[stack]"
        kind = "anon shared" if status & ANON_SHARED else "anon"
        return f"{kind} {v[1]:#x}+{(v[2] - v[1]) >> 20}MiB"

    def read(self, address: int, size: int) -> bytes:
        out = bytearray(size)
        end, covered = address + size, 0
        i = max(bisect_right(self.starts, address) - 1, 0)
        while i < len(self.runs) and self.runs[i][0] < end:
            start, count, offset = self.runs[i]
            lo, hi = max(start, address), min(start + count * PAGE, end)
            if lo < hi:
                out[lo - address:hi - address] = self.data[offset + lo - start:offset + hi - start]
                covered += hi - lo
            i += 1
        v = self.vma(address)
        if covered < size and v and v.get(7, 0) & (FILE_PRIVATE | FILE_SHARED) and v.get(4) in self.paths:
            try:  # not dumped: the file's own bytes (an approximation where the page was dumped in part)
                with open(self.paths[v[4]], "rb") as f:
                    f.seek(v.get(3, 0) + address - v[1])
                    data = f.read(min(size, v[2] - address))
                if covered == 0:
                    out[:len(data)] = data
            except OSError:
                pass
        return bytes(out)

    def c_string(self, address: int, limit: int = 200) -> str:
        raw = self.read(address, limit)
        return raw.split(b"\0", 1)[0].decode(errors="replace")


def kind(head: bytes) -> str:
    if head.startswith(b"\x7fELF"):
        return f"ELF machine {struct.unpack_from('<H', head, 18)[0]}"
    if head.startswith(b"\x50\xed\x55\xba"):
        return "fatbin"
    if not any(head):
        return "zeros"
    printable = sum(32 <= b < 127 or b in (9, 10) for b in head)
    return "text" if printable > 0.9 * len(head) else "binary"


def walk_heap(heap: bytes, base: int) -> list[tuple[int, int, bool]]:
    """glibc's main-arena chunks from the heap's start: (address of the user data, size, in use)."""
    chunks, at, end = [], 0, len(heap)
    while at + 16 <= end:
        size = struct.unpack_from("<Q", heap, at + 8)[0] & ~7
        if size < 32 or at + size > end:
            break
        nxt = at + size
        in_use = nxt + 16 <= end and bool(struct.unpack_from("<Q", heap, nxt + 8)[0] & 1)  # the last: top
        chunks.append((base + at + 16, size, in_use))
        at = nxt
    return chunks


def type_name(memory: Memory, address: int, names: dict) -> str | None:
    """The name of the Python type object at `address`, if it looks like one (tp_name at +24, a C string)."""
    if address not in names:
        name = None
        if memory.vma(address) is not None:
            pointer = struct.unpack("<Q", memory.read(address + 24, 8))[0]
            if memory.vma(pointer) is not None:
                text = memory.c_string(pointer)
                if text and re.fullmatch(r"[A-Za-z_][\w.]*", text):
                    name = text
        names[address] = name
    return names[address]


def is_object(memory: Memory, address: int, names: dict) -> bool:
    """Whether `address` looks like a Python object's: its type pointer at +8 names a type."""
    if address <= 0x10000 or address % 8 or memory.vma(address) is None:
        return False
    return type_name(memory, struct.unpack("<Q", memory.read(address + 8, 8))[0], names) is not None


def is_dict_keys(first: int, second: int) -> bool:
    """Whether a chunk starts as CPython's PyDictKeysObject: a small dk_refcnt, then dk_log2_size,
    dk_log2_index_bytes (log2_size + 0 to 3) and dk_kind (0 to 2) as bytes."""
    log2_size, log2_index, kind = second & 0xFF, second >> 8 & 0xFF, second >> 16 & 0xFF
    return 0 < first < 2**20 and 3 <= log2_size <= 30 and 0 <= log2_index - log2_size <= 3 and kind <= 2


def python_types(memory: Memory, heap: bytes, base: int, chunks, top: int) -> list[tuple[str, int, int]]:
    """Bytes and chunks in use by the Python type of the object each holds (type pointer at +8, or at +24
    behind a GC header); the others by the first library their first 64 bytes point into (a C++ object's
    vtable, a C structure's function or static data), or as 'no pointer into a file'."""
    by_label, counts, names = Counter(), Counter(), {}
    for address, size, in_use in chunks:
        if not in_use:
            continue
        offset, label = address - base, None
        words = struct.unpack_from(f"<{min(8, (size - 16) // 8)}Q", heap, offset) if size >= 24 else ()
        for at in (1, 3):
            if at < len(words) and words[at] > 0x10000 and (name := type_name(memory, words[at], names)):
                label = name
                break
        if label is None and len(words) > 1 and is_dict_keys(words[0], words[1]):
            label = "no Python object, a dict's keys table"
        if label is None and sum(is_object(memory, word, names) for word in words[:4]) >= 2:
            label = "no Python object, points to Python objects (a list's items, a tuple's, a set's)"
        if label is None:
            label = "no Python object, no pointer into a file"
            for word in words:
                v = memory.vma(word) if word > 0x10000 else None
                if v is not None and v.get(7, 0) & (FILE_PRIVATE | FILE_SHARED):
                    label = f"no Python object, points into {memory.where(word)}"
                    break
        by_label[label] += size
        counts[label] += 1
    return [(name, size, counts[name]) for name, size in by_label.most_common(top)]


def common_sizes(chunks, top: int) -> list[tuple[int, int]]:
    """The chunk sizes in use that hold the most bytes: (size, how many)."""
    sizes = Counter(size for _, size, in_use in chunks if in_use)
    return sorted(sizes.items(), key=lambda kv: -kv[0] * kv[1])[:top]


def scan(memory: Memory) -> tuple[Counter, Counter]:
    """Bytes of ELF images (by machine) and fat binaries found in the dumped pages, by mapping."""
    found, count = Counter(), Counter()
    for start, pages, offset in memory.runs:
        data = memory.data[offset:offset + pages * PAGE]
        where = memory.where(start)
        for m in ELF.finditer(data):
            h = memory.read(start + m.start(), 64)
            machine, shoff, shentsize, shnum = (struct.unpack_from("<H", h, 18)[0], struct.unpack_from("<Q", h, 40)[0],
                                                *struct.unpack_from("<HH", h, 58))
            size = shoff + shentsize * shnum
            vma = memory.vma(start + m.start())  # a header that claims more than its mapping holds is not one
            if vma and 0 < size <= vma[2] - (start + m.start()):
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
    memory = Memory(args.image, pid)
    print(f"pid {pid}: {sum(r[1] for r in memory.runs) * PAGE / 2**20:.1f} MiB of pages")
    by_mapping = Counter()
    for start, pages, _ in memory.runs:
        by_mapping[memory.where(start)] += pages * PAGE
    print("dumped, by mapping:", ", ".join(f"{w} {b / 2**20:.1f}" for w, b in by_mapping.most_common(args.top)))
    heap_vma = next((v for v in memory.vmas if v.get(7, 0) & HEAP), None)
    if heap_vma:
        base = heap_vma[1]
        heap = memory.read(base, heap_vma[2] - base)
        chunks = walk_heap(heap, base)
        print(f"\n[heap] {len(heap) / 2**20:.1f} MiB, walked {sum(c[1] for c in chunks) / 2**20:.1f} MiB in "
              f"{len(chunks)} chunks: in use {sum(c[1] for c in chunks if c[2]) / 2**20:.1f} MiB, "
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
                kinds[kind(heap[address - base:address - base + 256])] += size
        print("  in use, chunks of 64 KiB or more, by their first bytes:",
              ", ".join(f"{k} {v / 2**20:.1f} MiB" for k, v in kinds.most_common()))
        try:
            print("  in use, by the Python type of the object a chunk holds:")
            for name, size, n in python_types(memory, heap, base, chunks, args.top):
                print(f"    {size / 2**20:8.1f} MiB {n:8} chunks  {name}")
        except Exception as e:  # a guess at Python's layout that failed: the rest still says something
            print(f"    (failed: {type(e).__name__}: {e})")
        print("  in use, the chunk sizes that hold the most:",
              ", ".join(f"{n} x {size} B = {n * size / 2**20:.1f} MiB" for size, n in common_sizes(chunks, 12)))
        print(f"  the {args.top} largest in use:")
        for address, size, _ in sorted((c for c in chunks if c[2]), key=lambda c: -c[1])[:args.top]:
            head = heap[address - base:address - base + 256]
            print(f"    {size / 2**20:8.2f} MiB at {address:#x}: {kind(head):16} {head[:32].hex()}")
    found, count = scan(memory)
    print("\nrecognised in the dumped pages (bytes, count, mapping):")
    for (what, where), size in sorted(found.items(), key=lambda kv: -kv[1])[:args.top]:
        print(f"  {size / 2**20:8.1f} MiB {count[(what, where)]:6}  {what:16} {where}")
    for (what, where), n in count.items():
        if what == "PTX text":
            print(f"  PTX modules: {n} in {where}")


if __name__ == "__main__":
    main()
