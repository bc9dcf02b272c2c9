"""What leaving an engine snapshot's zero pages out costs when the set is made (issue 38, item 4: the
trade): presharded.criu_pages.trim on a synthetic dump shaped as the 8B's engine process (one anonymous
mapping, its pages 54% zeros in 2 MiB runs, dev/results/new-node-2026-12-06-h100-d), just written (in the
page cache, as CRIU leaves it), against hashing the same file (which making a set does anyway).

    python dev/trim_cost.py --mib 3400 [--folder /tmp] [--json]
"""

import argparse
import json
import os
import tempfile
import time
from pathlib import Path

from presharded.criu_pages import (ANON_PRIVATE, BYTES, MM_MAGIC, PAGE, PAGEMAP_MAGIC, PE_PRESENT, VARINT,
                                   encode, image_bytes, trim)
from presharded.manifest import hash_file

BLOCK = 2 * 2**20
ADDRESS = 0x7F0000000000


def synthetic_dump(folder: Path, mib: int, zero_percent: int) -> None:
    blocks = mib * 2**20 // BLOCK
    pages = blocks * BLOCK // PAGE
    vma = encode([(1, VARINT, ADDRESS), (2, VARINT, ADDRESS + pages * PAGE), (3, VARINT, 0), (4, VARINT, 0),
                  (5, VARINT, 3), (6, VARINT, 0x22), (7, VARINT, 1 | ANON_PRIVATE), (8, VARINT, 1)])
    (folder / "mm-1.img").write_bytes(image_bytes(MM_MAGIC, [encode([(1, VARINT, 0), (14, BYTES, vma)])]))
    entry = encode([(1, VARINT, ADDRESS), (2, VARINT, 0), (4, VARINT, PE_PRESENT), (5, VARINT, pages)])
    (folder / "pagemap-1.img").write_bytes(image_bytes(PAGEMAP_MAGIC, [encode([(1, VARINT, 2)]), entry]))
    with open(folder / "pages-2.img", "wb") as f:
        for i in range(blocks):
            f.write(bytes(BLOCK) if (i * zero_percent) % 100 < zero_percent else os.urandom(BLOCK))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--mib", type=int, default=3400)
    parser.add_argument("--zero-percent", type=int, default=54)
    parser.add_argument("--folder", default="/tmp")
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(dir=args.folder) as work:
        folder = Path(work)
        synthetic_dump(folder, args.mib, args.zero_percent)
        pages = folder / "pages-2.img"
        size = pages.stat().st_size
        t = time.perf_counter()
        hash_file(pages)
        hash_whole = time.perf_counter() - t
        t = time.perf_counter()
        dropped = trim(folder)
        trimmed = time.perf_counter() - t
        t = time.perf_counter()
        hash_file(pages)
        hash_trimmed = time.perf_counter() - t
    result = {"bytes": size, "dropped": dropped, "trim_s": round(trimmed, 3), "hash_whole_s": round(hash_whole, 3),
              "hash_trimmed_s": round(hash_trimmed, 3), "cpus": os.cpu_count()}
    print(json.dumps(result) if args.json else
          f"{size / 2**20:.0f} MiB, {dropped / 2**20:.0f} MiB of zeros out in {trimmed:.2f} s; hashing it "
          f"whole {hash_whole:.2f} s, trimmed {hash_trimmed:.2f} s ({os.cpu_count()} CPUs)")


if __name__ == "__main__":
    main()
