"""How fast a snapshot's image is copied into memory from a cold disk, hashed as it is copied
(presharded.manifest.copy_hashed), by how many threads, against `cat` of the same files; each
from a page cache written back, dropped and checked (mincore), taking turns. Root only.

    python dev/image_copy.py CHECKPOINT --threads 1,2,4,8 --repeats 2 > image-copy.json
"""

import argparse
import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

from presharded.bench import resident_pages
from presharded.manifest import copy_hashed, read_manifest


def cold(files: list[Path]) -> None:
    os.sync()
    Path("/proc/sys/vm/drop_caches").write_text("3")
    resident, total = resident_pages(files)
    assert resident == 0, f"{resident} of {total} pages still cached"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("checkpoint", type=Path)
    parser.add_argument("--threads", type=lambda s: [int(x) for x in s.split(",")], default=[1, 2, 4, 8])
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--into", type=Path, default=Path("/dev/shm/image-copy"))
    args = parser.parse_args()
    manifest = read_manifest(args.checkpoint)
    files = [args.checkpoint / e.path for entries in manifest.snapshots.values() for e in entries
             if "/weights/" not in e.path and "/compiled/" not in e.path]
    size = sum(f.stat().st_size for f in files)
    rows = []
    for repeat in range(args.repeats):
        cold(files)
        start = time.perf_counter()
        subprocess.run(["cat", *map(str, files)], stdout=subprocess.DEVNULL, check=True)
        rows.append({"repeat": repeat, "how": "cat", "seconds": round(time.perf_counter() - start, 3)})
        for threads in args.threads:
            cold(files)
            args.into.mkdir(parents=True, exist_ok=True)
            start = time.perf_counter()
            for f in files:
                copy_hashed(f, args.into / f.name, threads)
            rows.append({"repeat": repeat, "how": f"copy_hashed, {threads} threads",
                         "seconds": round(time.perf_counter() - start, 3)})
            shutil.rmtree(args.into)
        for row in rows[-1 - len(args.threads):]:
            row["gbps"] = round(size / row["seconds"] / 1e9, 3)
            print(json.dumps(row), file=sys.stderr)
    print(json.dumps({"bytes": size, "files": len(files), "rows": rows}))


if __name__ == "__main__":
    main()
