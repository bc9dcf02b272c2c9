"""An engine snapshot's pages without its zeros. Half a GPU engine's image is
pages of zeros (cuda-checkpoint's copy of what sleep leaves on the GPU:
dev/results/new-node-2026-12-06-h100-c). CRIU restores an anonymous private
mapping into fresh memory, where a page it does not write reads as zero (its
own dump leaves out pages never touched the same way), so those pages can
leave the image: each process's page map (`pagemap-ID.img`, protobuf entries
of address and page count) loses its runs of zeros inside anonymous private
mappings (`mm-ID.img`), and its page file (`pages-N.img`) their bytes. A
file-backed or shared mapping keeps every page: there an absent page is not
zero. The smaller image is copied, hashed and restored faster, warm too
(dev/results/new-node-2026-12-06-h100-d)."""

import mmap
import os
import struct
import sys
from pathlib import Path
from typing import BinaryIO

import numpy as np

PAGE = 4096
MIN_RUN = 16  # pages: a shorter run of zeros stays (each cut is one more entry for CRIU to read)
CHUNK_PAGES = 2**14  # 64 MiB of pages checked at a time
COMMON_MAGIC, PAGEMAP_MAGIC, MM_MAGIC = 0x54564319, 0x56084025, 0x57492820
ANON_PRIVATE = 1 << 9  # vma_entry.status (criu/include/image.h); and those CRIU restores its own way:
SPECIAL = sum(1 << bit for bit in (2, 3, 10, 11, 12, 13, 14, 15, 17))  # vsyscall, vdso, SysV, socket, vvar, AIO,
# memfd, shadow stack, uprobes
PE_PARENT, PE_PRESENT = 1 << 0, 1 << 2  # pagemap_entry.flags (criu/include/pagemap.h)
VARINT, BYTES = 0, 2  # protobuf wire types: every field these images hold is one of the two

Fields = list[tuple[int, int, int | bytes]]


def varint(data: bytes, pos: int) -> tuple[int, int]:
    value = shift = 0
    while True:
        byte = data[pos]
        value |= (byte & 0x7F) << shift
        pos, shift = pos + 1, shift + 7
        if byte < 0x80:
            return value, pos


def as_varint(value: int) -> bytes:
    out = bytearray()
    while value >= 0x80:
        out.append(value & 0x7F | 0x80)
        value >>= 7
    out.append(value)
    return bytes(out)


def parse(data: bytes) -> Fields:
    """A protobuf message as (field, wire type, value), in order."""
    fields, pos = [], 0
    while pos < len(data):
        key, pos = varint(data, pos)
        number, kind = key >> 3, key & 7
        if kind == VARINT:
            value, pos = varint(data, pos)
        elif kind == BYTES:
            size, pos = varint(data, pos)
            value, pos = data[pos:pos + size], pos + size
        else:
            raise ValueError(f"wire type {kind} in a CRIU image entry")
        fields.append((number, kind, value))
    return fields


def encode(fields: Fields) -> bytes:
    out = b""
    for number, kind, value in fields:
        body = as_varint(value) if kind == VARINT else as_varint(len(value)) + value
        out += as_varint(number << 3 | kind) + body
    return out


def read_image(path: Path, magic: int) -> list[bytes]:
    """CRIU's protobuf image: two magics, then entries each after its 32-bit size."""
    data = path.read_bytes()
    if struct.unpack_from("<II", data) != (COMMON_MAGIC, magic):
        raise ValueError(f"{path.name} is not the CRIU image it is named as")
    entries, pos = [], 8
    while pos < len(data):
        (size,) = struct.unpack_from("<I", data, pos)
        entries.append(data[pos + 4:pos + 4 + size])
        pos += 4 + size
    if pos != len(data):
        raise ValueError(f"{path.name} ends inside an entry")
    return entries


def image_bytes(magic: int, entries: list[bytes]) -> bytes:
    return struct.pack("<II", COMMON_MAGIC, magic) + b"".join(struct.pack("<I", len(e)) + e for e in entries)


def anon_private(mm: Path) -> np.ndarray:
    """The process's anonymous private mappings as rows of [start, end), sorted."""
    vmas = [dict((n, v) for n, _, v in parse(raw)) for n, _, raw in parse(read_image(mm, MM_MAGIC)[0]) if n == 14]
    rows = sorted((v[1], v[2]) for v in vmas if v[7] & ANON_PRIVATE and not v[7] & SPECIAL)
    return np.array(rows, dtype=np.uint64).reshape(-1, 2)


def droppable(pages: np.ndarray, first: int, vaddr: int, count: int, anon: np.ndarray) -> np.ndarray:
    """Per page of one entry (`count` rows of `pages` from `first`): all zero and inside an anonymous
    private mapping."""
    if first + count > len(pages):
        raise ValueError("the page file is shorter than its page map")
    if not count or not len(anon):
        return np.zeros(count, dtype=bool)
    zero = np.concatenate([~pages[at:min(at + CHUNK_PAGES, first + count)].any(axis=1)
                           for at in range(first, first + count, CHUNK_PAGES)])
    addresses = np.uint64(vaddr) + np.arange(count, dtype=np.uint64) * np.uint64(PAGE)
    row = np.searchsorted(anon[:, 0], addresses, side="right") - 1
    inside = (row >= 0) & (addresses < anon[np.maximum(row, 0), 1])
    return zero & inside


def kept_runs(drop: np.ndarray) -> list[tuple[int, int]]:
    """[first page, pages) of what stays: all but runs of MIN_RUN droppable pages or more."""
    edges = np.flatnonzero(np.diff(np.concatenate([[0], drop.astype(np.int8), [0]])))
    cuts = [(int(a), int(b)) for a, b in zip(edges[::2], edges[1::2]) if b - a >= MIN_RUN]
    runs, at = [], 0
    for a, b in cuts:
        if a > at:
            runs.append((at, a - at))
        at = b
    if at < len(drop):
        runs.append((at, len(drop) - at))
    return runs


def with_pages(entry: Fields, vaddr: int, count: int) -> bytes:
    """The entry for `count` pages from `vaddr`, its other fields as they were."""
    counted = {n for n, _, _ in entry}
    fields = []
    for number, kind, value in entry:
        if number == 1:
            value = vaddr
        elif number == 5 or (number == 2 and (5 not in counted or value)):  # nr_pages; compat_nr_pages if used
            value = count
        fields.append((number, kind, value))
    return encode(fields)


def present(entry: dict) -> bool:
    """Whether the entry's pages are in the page file (CRIU's rule for entries with and without flags)."""
    if 4 in entry:
        return bool(entry[4] & PE_PRESENT)
    return not entry.get(3, 0)


def page_rows(f: BinaryIO) -> np.ndarray:
    """The page file as rows of one page each, mapped: read in place, no copy (unmapped with the array)."""
    size = os.fstat(f.fileno()).st_size
    if size % PAGE:
        raise ValueError("the page file is not whole pages")
    if not size:
        return np.zeros((0, PAGE // 8), dtype=np.uint64)
    return np.frombuffer(mmap.mmap(f.fileno(), size, prot=mmap.PROT_READ), dtype=np.uint64).reshape(-1, PAGE // 8)


def trim_process(folder: Path, pagemap: Path, mm: Path) -> int:
    """One process's page map and page file without its runs of zeros; the bytes left out."""
    head, *entries = read_image(pagemap, PAGEMAP_MAGIC)
    pages = folder / f"pages-{dict((n, v) for n, _, v in parse(head))[1]}.img"
    anon, kept_entries, kept_bytes, offset = anon_private(mm), [head], [], 0
    with open(pages, "rb") as src:
        view = page_rows(src)
        for raw in entries:
            fields = parse(raw)
            entry = {n: v for n, _, v in fields}
            count = entry.get(5, entry[2])
            if not present(entry):
                kept_entries.append(raw)
                continue
            for first, n in kept_runs(droppable(view, offset // PAGE, entry[1], count, anon)):
                kept_entries.append(with_pages(fields, entry[1] + first * PAGE, n))
                kept_bytes.append((offset + first * PAGE, n * PAGE))
            offset += count * PAGE
        if offset != len(view) * PAGE:
            raise ValueError(f"{pages.name} holds {len(view) * PAGE} bytes, its page map {offset}")
        dropped = offset - sum(n for _, n in kept_bytes)
        if not dropped:
            return 0
        new_pages, new_map = (p.with_name(f".{p.name}.trimmed") for p in (pages, pagemap))
        with open(new_pages, "xb") as dst:  # new files: never through a name already there
            for start, n in kept_bytes:
                while n:
                    copied = os.copy_file_range(src.fileno(), dst.fileno(), n, start)
                    start, n = start + copied, n - copied
        with open(new_map, "xb") as dst:
            dst.write(image_bytes(PAGEMAP_MAGIC, kept_entries))
    for new, old in ((new_pages, pages), (new_map, pagemap)):
        os.chmod(new, os.stat(old).st_mode & 0o777)
        os.replace(new, old)
    return dropped


def trim(folder: Path) -> int:
    """Every process's pages in a CRIU dump without their runs of zeros; the bytes left out. An image not
    as this reads CRIU 4.2's is left whole, with a warning: it restores as it was dumped."""
    dropped = 0
    for pagemap in sorted(folder.glob("pagemap-*.img")):
        ident = pagemap.name.removeprefix("pagemap-").removesuffix(".img")
        if not ident.isdigit() or not (folder / f"mm-{ident}.img").exists():  # shared memory's: kept whole
            continue
        try:
            dropped += trim_process(folder, pagemap, folder / f"mm-{ident}.img")
        except (ValueError, KeyError, IndexError, struct.error) as e:
            print(f"warning: {pagemap.name} kept whole, not read as CRIU 4.2 writes it: {e}", file=sys.stderr)
    return dropped
