"""How long a start's manifest checks take on a checkpoint: `read_manifest` (every listed path
checked to stay inside the folder) and the whole `check_for_load` of rank 0, each the best and
the worst of RUNS, in this process (the page cache warm after the first). Run it with the package
of each version on PYTHONPATH to compare them on the same files:

    PYTHONPATH=. python3 dev/manifest_time.py /root/bench/tp1 --runs 5
"""

import argparse
import json
import time
from pathlib import Path

from presharded.load_checks import check_for_load
from presharded.manifest import read_manifest


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("checkpoint", type=Path)
    parser.add_argument("--runs", type=int, default=5)
    args = parser.parse_args()
    seconds: dict[str, list[float]] = {"read_manifest": [], "check_for_load": []}
    for _ in range(args.runs):
        t = time.perf_counter()
        manifest = read_manifest(args.checkpoint)
        seconds["read_manifest"].append(time.perf_counter() - t)
        t = time.perf_counter()
        check_for_load(args.checkpoint, tensor_parallel_size=manifest.tensor_parallel_size,
                       pipeline_parallel_size=manifest.pipeline_parallel_size, rank=(0, 0))
        seconds["check_for_load"].append(time.perf_counter() - t)
    print(json.dumps({"package": __import__("presharded").__file__, "entries": len(manifest.entries()),
                      **{k: [round(min(v), 4), round(max(v), 4)] for k, v in seconds.items()}}))


if __name__ == "__main__":
    main()
