"""How long a start's manifest checks take on a checkpoint: `read_manifest` (every listed path
checked to stay inside the folder) and the whole `check_for_load` of rank 0, each the best and
the worst of RUNS, in this process (the page cache warm after the first). Run it with the package
of each version on PYTHONPATH to compare them on the same files:

    PYTHONPATH=. python3 dev/manifest_time.py /root/bench/tp1 --runs 5

With --make-from MANIFEST(.gz), the checkpoint folder is made first from a manifest alone, each file
it lists an empty (sparse) file of its size, and only `read_manifest` is timed (nothing in the files
is read):

    PYTHONPATH=. python3 dev/manifest_time.py /tmp/fake --make-from dev/results/image-graphs-2026-12-07-h100/manifest-8b.json.gz
"""

import argparse
import gzip
import json
import os
import time
from pathlib import Path

from presharded.load_checks import check_for_load
from presharded.manifest import read_manifest


def make(folder: Path, manifest: Path) -> None:
    text = (gzip.open if manifest.suffix == ".gz" else open)(manifest, "rt").read()
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "presharded.json").write_text(text)
    raw = json.loads(text)
    entries = [*raw["shards"], *raw["files"], *(e for sets in (raw.get("caches", {}), raw.get("snapshots", {}))
                                              for files in sets.values() for e in files)]
    for entry in entries:
        path = folder / entry["path"]
        path.parent.mkdir(parents=True, exist_ok=True)
        with open(path, "wb") as f:
            os.truncate(f.fileno(), entry["size"])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("checkpoint", type=Path)
    parser.add_argument("--runs", type=int, default=5)
    parser.add_argument("--make-from", type=Path, help="a manifest (.json or .json.gz) to make the folder from")
    args = parser.parse_args()
    if args.make_from:
        make(args.checkpoint, args.make_from)
    seconds: dict[str, list[float]] = {"read_manifest": []} if args.make_from else {"read_manifest": [],
                                                                                    "check_for_load": []}
    for _ in range(args.runs):
        t = time.perf_counter()
        manifest = read_manifest(args.checkpoint)
        seconds["read_manifest"].append(time.perf_counter() - t)
        if args.make_from:
            continue
        t = time.perf_counter()
        check_for_load(args.checkpoint, tensor_parallel_size=manifest.tensor_parallel_size,
                       pipeline_parallel_size=manifest.pipeline_parallel_size, rank=(0, 0))
        seconds["check_for_load"].append(time.perf_counter() - t)
    print(json.dumps({"package": __import__("presharded").__file__, "entries": len(manifest.entries()),
                      **{k: [round(min(v), 4), round(max(v), 4)] for k, v in seconds.items()}}))


if __name__ == "__main__":
    main()
