"""Where a CRIU image's bytes go (issue 25: the warm restore is mostly CRIU
restoring process memory): the pages dumped per process, by mapping (a file's
path, the heap, the stack, or one anonymous region by its address and size),
largest first, and the image's other big files (ghost files: vLLM's queues).

    PYTHONPATH=/tmp/criu-src/lib python3 dev/image_sizes.py CKPT/snapshots/SET [--top 15] [--json]

Needs CRIU's pycriu (lib/pycriu of its source tree, `make lib` built) and
protobuf for Python (vLLM brings it).
"""

import argparse
import json
from collections import Counter
from pathlib import Path

import pycriu

PAGE = 4096
PE_PRESENT = 1 << 2  # criu/include/pagemap.h: the pages are in pages-*.img
STACK, HEAP, FILE_PRIVATE, FILE_SHARED, ANON_SHARED = 1 << 1, 1 << 5, 1 << 6, 1 << 7, 1 << 8  # image.h


def load(path: Path) -> list[dict]:
    with open(path, "rb") as f:
        return pycriu.images.load(f)["entries"]


def mapping(vma: dict, files: dict[int, str]) -> str:
    status = vma["status"]
    if status & (FILE_PRIVATE | FILE_SHARED):
        return files.get(vma["shmid"], f"file {vma['shmid']}")
    if status & HEAP:
        return "[heap]"
    if status & STACK:
        return "[stack]"
    kind = "anon shared" if status & ANON_SHARED else "anon"
    return f"[{kind} {vma['start']:#x}, {(vma['end'] - vma['start']) / 2**20:.0f} MiB]"


def process_pages(image: Path, pid: int, files: dict[int, str]) -> tuple[Counter, int]:
    """Bytes of this process's pages in the image, per mapping; and how many mappings it has."""
    vmas = sorted(load(image / f"mm-{pid}.img")[0]["vmas"], key=lambda v: v["start"])
    sizes: Counter = Counter()
    for entry in load(image / f"pagemap-{pid}.img")[1:]:
        if not entry["flags"] & PE_PRESENT:
            continue
        vma = next((v for v in vmas if v["start"] <= entry["vaddr"] < v["end"]), None)
        sizes[mapping(vma, files) if vma else "[outside any mapping]"] += entry["nr_pages"] * PAGE
    return sizes, len(vmas)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("image", type=Path)
    parser.add_argument("--top", type=int, default=15)
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args()
    files = {e["id"]: e["reg"]["name"] for e in load(args.image / "files.img") if e.get("type") == "REG"}
    report = {"files": {p.name: p.stat().st_size for p in sorted(args.image.iterdir()) if p.stat().st_size > 2**20},
              "processes": []}
    for node in load(args.image / "pstree.img"):
        pid = node["pid"]
        comm = load(args.image / f"core-{pid}.img")[0]["tc"]["comm"]
        sizes, vmas = process_pages(args.image, pid, files)
        report["processes"].append({"pid": pid, "comm": comm, "bytes": sum(sizes.values()), "mappings": vmas,
                                    "threads": len(node.get("threads", [])), "largest": sizes.most_common(args.top)})
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
