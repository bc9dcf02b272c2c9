"""Where a CRIU image's bytes go (issue 25: the warm restore is mostly CRIU
restoring process memory): the pages dumped per process, by mapping (a file's
name, the heap, the stack, or one anonymous region by its address and size),
largest first, and the image's other big files (ghost files: vLLM's queues).

    python3 dev/image_sizes.py CKPT/snapshots/SET [--top 15] [--json]

Reads the images as dev/heap_contents.py does, with presharded/criu_pages.py's
protobuf reader (CRIU 4.2's field numbers), so it needs no pycriu.
"""

import argparse
import json
from collections import Counter
from pathlib import Path

from heap_contents import PAGE, PSTREE_MAGIC, Memory, fields
from presharded.criu_pages import parse, read_image

CORE_MAGIC = 0x55053847  # criu/include/magic.h


def comm(image: Path, pid: int) -> str:
    """The process's name: core_entry.tc (3), task_core_entry.comm (6)."""
    try:
        tc = fields(read_image(image / f"core-{pid}.img", CORE_MAGIC)[0]).get(3, b"")
        return fields(tc).get(6, b"?").decode(errors="replace")
    except (OSError, ValueError, IndexError):  # a field this reader does not take: the name is not needed
        return "?"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("image", type=Path)
    parser.add_argument("--top", type=int, default=15)
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args()
    report = {"files": {p.name: p.stat().st_size for p in sorted(args.image.iterdir()) if p.stat().st_size > 2**20},
              "processes": []}
    for raw in read_image(args.image / "pstree.img", PSTREE_MAGIC):
        pstree = parse(raw)
        pid = next(v for n, _, v in pstree if n == 1)
        memory, sizes = Memory(args.image, pid), Counter()
        for start, pages, _ in memory.runs:
            sizes[memory.where(start)] += pages * PAGE
        report["processes"].append({"pid": pid, "comm": comm(args.image, pid), "bytes": sum(sizes.values()),
                                    "mappings": len(memory.vmas), "threads": sum(n == 5 for n, _, _ in pstree),
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
