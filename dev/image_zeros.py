"""How much of an engine snapshot's image is pages of zeros (issue 38, item 4:
what can be rebuilt faster than it can be read). Zeros cost nothing to make
again: a page never written reads as zero. Per file of the set, its size and
how many of its 4 KiB pages are all zero, and how many runs of 2 MiB or more
those zeros make (what a sparse image or a pagemap without them would skip).

    python3 dev/image_zeros.py CKPT/snapshots/SET [--json]
"""

import argparse
import json
from pathlib import Path

import numpy as np

PAGE = 4096
CHUNK = 64 * 2**20
RUN = 2 * 2**20 // PAGE  # pages in 2 MiB


def zero_pages(path: Path) -> dict:
    """The file's size, its zero pages, and the zero pages in runs of RUN pages or more."""
    flags = []
    with open(path, "rb") as f:
        while chunk := f.read(CHUNK):
            tail = len(chunk) % PAGE
            pages = np.frombuffer(chunk[:len(chunk) - tail], dtype=np.uint64).reshape(-1, PAGE // 8)
            flags.append(~pages.any(axis=1))
            if tail:
                flags.append(np.array([not any(chunk[-tail:])]))
    zero = np.concatenate(flags) if flags else np.zeros(0, dtype=bool)
    # runs of zeros: where the flag changes
    edges = np.flatnonzero(np.diff(np.concatenate([[0], zero.astype(np.int8), [0]])))
    lengths = edges[1::2] - edges[::2]
    return {"bytes": path.stat().st_size, "zero_pages": int(zero.sum()), "pages": int(zero.size),
            "zero_pages_in_2mib_runs": int(lengths[lengths >= RUN].sum())}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("image", type=Path)
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args()
    files = {p.name: zero_pages(p) for p in sorted(args.image.iterdir()) if p.is_file() and p.stat().st_size > 2**20}
    total = {k: sum(f[k] for f in files.values()) for k in ("bytes", "zero_pages", "pages", "zero_pages_in_2mib_runs")}
    if args.json:
        print(json.dumps({"files": files, "total": total}, indent=1))
        return
    for name, f in [*files.items(), ("total", total)]:
        print(f"{name:40s} {f['bytes'] / 2**20:9.1f} MiB  zero {f['zero_pages'] * PAGE / 2**20:9.1f} MiB "
              f"({f['zero_pages'] / max(f['pages'], 1):.1%}), in 2 MiB runs {f['zero_pages_in_2mib_runs'] * PAGE / 2**20:.1f} MiB")


if __name__ == "__main__":
    main()
