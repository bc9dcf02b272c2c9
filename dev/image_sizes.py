"""Where a CRIU image's bytes go (issue 25: the warm restore is mostly CRIU
restoring process memory): the pages dumped per process, by mapping (a file's
path, the heap, the stack, or one anonymous region by its address and size),
largest first, and the image's other big files (ghost files: vLLM's queues).

    python3 dev/image_sizes.py CKPT/snapshots/SET [--top 15] [--json]

Reads the images with presharded/criu_pages.py's protobuf reader (CRIU 4.2's
field numbers, images/*.proto), so it needs no pycriu.
"""

import argparse
import json
from collections import Counter
from pathlib import Path

from presharded.criu_pages import MM_MAGIC, PAGEMAP_MAGIC, parse, present, read_image

PAGE = 4096
PSTREE_MAGIC, CORE_MAGIC, FILES_MAGIC = 0x50273030, 0x55053847, 0x56303138  # criu/include/magic.h
STACK, HEAP, FILE_PRIVATE, FILE_SHARED, ANON_SHARED = 1 << 1, 1 << 5, 1 << 6, 1 << 7, 1 << 8  # image.h
REG = 1  # file_entry.type


def entries(path: Path, magic: int) -> list[dict]:
    """The image's entries, each as {field number: value} (the last value of a repeated field)."""
    return [dict((n, v) for n, _, v in parse(raw)) for raw in read_image(path, magic)]


def vmas_of(mm: Path) -> list[dict]:
    """mm_entry's vmas (field 14): start 1, end 2, shmid 4, status 7."""
    return sorted((dict((n, v) for n, _, v in parse(raw)) for n, _, raw in parse(read_image(mm, MM_MAGIC)[0])
                   if n == 14), key=lambda v: v[1])


def mapping(vma: dict, files: dict[int, str]) -> str:
    status = vma.get(7, 0)
    if status & (FILE_PRIVATE | FILE_SHARED):
        return files.get(vma.get(4), f"file {vma.get(4)}")
    if status & HEAP:
        return "[heap]"
    if status & STACK:
        return "[stack]"
    kind = "anon shared" if status & ANON_SHARED else "anon"
    return f"[{kind} {vma[1]:#x}, {(vma[2] - vma[1]) / 2**20:.0f} MiB]"


def process_pages(image: Path, pid: int, files: dict[int, str]) -> tuple[Counter, int]:
    """Bytes of this process's pages in the image, per mapping; and how many mappings it has."""
    vmas = vmas_of(image / f"mm-{pid}.img")
    sizes: Counter = Counter()
    for entry in entries(image / f"pagemap-{pid}.img", PAGEMAP_MAGIC)[1:]:  # after the head (pages_id)
        if not present(entry):
            continue
        vma = next((v for v in vmas if v[1] <= entry[1] < v[2]), None)
        sizes[mapping(vma, files) if vma else "[outside any mapping]"] += entry.get(5, entry.get(2, 0)) * PAGE
    return sizes, len(vmas)


def comm(image: Path, pid: int) -> str:
    """The process's name: core_entry.tc (3), task_core_entry.comm (6)."""
    try:
        tc = entries(image / f"core-{pid}.img", CORE_MAGIC)[0].get(3, b"")
        return dict((n, v) for n, _, v in parse(tc)).get(6, b"?").decode(errors="replace")
    except (OSError, ValueError, IndexError):  # a field this reader does not take: the name is not needed
        return "?"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("image", type=Path)
    parser.add_argument("--top", type=int, default=15)
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args()
    files = {e[2]: dict((n, v) for n, _, v in parse(e[3]))[6].decode(errors="replace")
             for e in entries(args.image / "files.img", FILES_MAGIC) if e.get(1) == REG and 3 in e}
    report = {"files": {p.name: p.stat().st_size for p in sorted(args.image.iterdir()) if p.stat().st_size > 2**20},
              "processes": []}
    for raw in read_image(args.image / "pstree.img", PSTREE_MAGIC):
        fields = parse(raw)
        pid = next(v for n, _, v in fields if n == 1)
        sizes, vmas = process_pages(args.image, pid, files)
        report["processes"].append({"pid": pid, "comm": comm(args.image, pid), "bytes": sum(sizes.values()),
                                    "mappings": vmas, "threads": sum(n == 5 for n, _, _ in fields),
                                    "largest": sizes.most_common(args.top)})
    if args.json:
        print(json.dumps(report, indent=1))
        return
    for name, size in report["files"].items():
        print(f"{size / 2**20:10.1f} MiB  {name}")
    for proc in report["processes"]:
        print(f"\npid {proc['pid']} ({proc['comm']}): {proc['bytes'] / 2**20:.1f} MiB of pages, "
              f"{proc['mappings']} mappings, {proc['threads']} threads")
        for where, size in proc["largest"]:
            print(f"{size / 2**20:10.1f} MiB  {where}")


if __name__ == "__main__":
    main()
