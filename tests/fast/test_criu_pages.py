"""An engine snapshot's pages without its zeros (presharded/criu_pages.py), on a dump laid out as CRIU 4.2
writes one: runs of zeros in anonymous private memory leave the page map and the page file; what a restore
builds from them (an absent anonymous page reads as zero) is the memory that was dumped."""

import os
import struct

import pytest

from presharded.criu_pages import (ANON_PRIVATE, BYTES, MM_MAGIC, PAGE, PAGEMAP_MAGIC, PE_PARENT, PE_PRESENT,
                                   VARINT, encode, image_bytes, parse, read_image, trim)

ANON, FILE = 0x7F0000000000, 0x7F1000000000
REGULAR, FILE_PRIVATE = 1, 1 << 6


def vma(start: int, pages: int, status: int) -> bytes:
    return encode([(1, VARINT, start), (2, VARINT, start + pages * PAGE), (3, VARINT, 0), (4, VARINT, 0),
                   (5, VARINT, 3), (6, VARINT, 0x22), (7, VARINT, status), (8, VARINT, 1)])


def entry(vaddr: int, pages: int, flags: int | None = PE_PRESENT, compat: bool = False) -> bytes:
    if compat:  # as CRIU before 4.2 wrote one: its count in field 2, no flags
        return encode([(1, VARINT, vaddr), (2, VARINT, pages)])
    return encode([(1, VARINT, vaddr), (2, VARINT, 0), (4, VARINT, flags), (5, VARINT, pages)])


def page(fill: int) -> bytes:
    return os.urandom(PAGE) if fill else bytes(PAGE)


def dump(folder):
    """mm-7.img (anonymous memory of 128 pages, a private file mapping of 32), pagemap-7.img and pages-3.img:
    the memory each present entry holds, by address."""
    mm = encode([(1, VARINT, 0), (12, VARINT, 5), (14, BYTES, vma(ANON, 128, REGULAR | ANON_PRIVATE)),
                 (14, BYTES, vma(FILE, 32, REGULAR | FILE_PRIVATE))])
    (folder / "mm-7.img").write_bytes(image_bytes(MM_MAGIC, [mm]))
    layout = [(ANON, [1] * 8 + [0] * 24 + [1] * 4 + [0] * 4 + [1] * 8, {}),  # 24 zeros go, the 4 stay
              (ANON + 48 * PAGE, [], {"pages": 2, "flags": PE_PARENT}),  # in a parent image: no data here
              (ANON + 64 * PAGE, [0] * 20, {"compat": True}),  # all zeros: the whole entry goes
              (FILE, [0] * 32, {})]  # a file's page: absent, it would read the file, so it stays
    memory, entries, data = {}, [encode([(1, VARINT, 3)])], b""
    for vaddr, fills, how in layout:
        entries.append(entry(vaddr, how.get("pages", len(fills)), how.get("flags", PE_PRESENT), how.get("compat", False)))
        for i, fill in enumerate(fills):
            memory[vaddr + i * PAGE] = page(fill)
            data += memory[vaddr + i * PAGE]
    (folder / "pagemap-7.img").write_bytes(image_bytes(PAGEMAP_MAGIC, entries))
    (folder / "pages-3.img").write_bytes(data)
    return memory


def restored(folder) -> tuple[dict, list]:
    """What a restore writes, by address, from the page map and page file; the entries without data."""
    head, *entries = read_image(folder / "pagemap-7.img", PAGEMAP_MAGIC)
    data, offset, memory, elsewhere = (folder / "pages-3.img").read_bytes(), 0, {}, []
    for raw in entries:
        e = {n: v for n, _, v in parse(raw)}
        count = e.get(5, e[2])
        if not e.get(4, PE_PRESENT) & PE_PRESENT:
            elsewhere.append((e[1], count))
            continue
        for i in range(count):
            memory[e[1] + i * PAGE] = data[offset:offset + PAGE]
            offset += PAGE
    assert offset == len(data)
    return memory, elsewhere


def test_protobuf_as_documented():
    assert encode([(1, VARINT, 150)]) == b"\x08\x96\x01"  # protobuf's encoding guide
    assert parse(b"\x08\x96\x01\x12\x02hi") == [(1, VARINT, 150), (2, BYTES, b"hi")]


def test_runs_of_zeros_in_anonymous_memory_leave_the_image(tmp_path):
    memory = dump(tmp_path)
    before = (tmp_path / "pages-3.img").stat().st_size
    (tmp_path / "pages-3.img").chmod(0o600)
    assert trim(tmp_path) == 44 * PAGE
    assert (tmp_path / "pages-3.img").stat().st_size == before - 44 * PAGE
    after, elsewhere = restored(tmp_path)
    for address, content in memory.items():  # absent anonymous pages read as zero: the same memory
        assert after.get(address, bytes(PAGE) if address < FILE else None) == content
    assert all(FILE + i * PAGE in after for i in range(32))  # the file's zero pages all kept
    assert elsewhere == [(ANON + 48 * PAGE, 2)]
    assert len(read_image(tmp_path / "pagemap-7.img", PAGEMAP_MAGIC)) == 1 + 2 + 1 + 1
    assert oct((tmp_path / "pages-3.img").stat().st_mode & 0o777) == "0o600"
    assert sorted(os.listdir(tmp_path)) == ["mm-7.img", "pagemap-7.img", "pages-3.img"]
    assert trim(tmp_path) == 0  # nothing left to take


def test_an_image_not_as_criu_writes_it_is_kept_whole(tmp_path, capsys):
    dump(tmp_path)
    pages = tmp_path / "pages-3.img"
    pages.write_bytes(pages.read_bytes()[:-PAGE])  # shorter than its page map
    before = {p.name: p.read_bytes() for p in tmp_path.iterdir()}
    assert trim(tmp_path) == 0
    assert "warning: pagemap-7.img kept whole" in capsys.readouterr().err
    assert {p.name: p.read_bytes() for p in tmp_path.iterdir()} == before
    (tmp_path / "pagemap-7.img").write_bytes(struct.pack("<II", 1, 2))  # another magic
    assert trim(tmp_path) == 0 and "is not the CRIU image it is named as" in capsys.readouterr().err


def test_a_name_planted_beside_the_pages_is_not_written_through(tmp_path):
    dump(tmp_path)
    elsewhere = tmp_path.parent / f"{tmp_path.name}-elsewhere"
    (tmp_path / ".pages-3.img.trimmed").symlink_to(elsewhere)
    with pytest.raises(FileExistsError):
        trim(tmp_path)
    assert not elsewhere.exists()
