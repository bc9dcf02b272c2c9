"""Weights-only speed of the fast loader on one rank's files: reads them into
freshly allocated tensors on the GPU (or CPU) for a few thread counts and
chunk sizes with the page cache warm, and prints GB/s for each, side by side
with a plain safetensors read (what vLLM's sharded_state does) of the same
files; then, with the cache dropped, the fast loader against `dd`.

    python dev/loader_sweep.py CHECKPOINT [--rank 0]
"""

import argparse
import json
import re
import time
from pathlib import Path

import torch
from safetensors import safe_open

from presharded.bench import dd_gbps, set_cache
from presharded.reader import Staging, load_files
from presharded.safetensors_layout import DTYPES, read_header
from presharded.manifest import read_manifest


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("checkpoint", type=Path)
    parser.add_argument("--rank", type=int, default=0)
    args = parser.parse_args()
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    manifest = read_manifest(args.checkpoint)
    files = [args.checkpoint / s.path for s in manifest.shards if s.tp_rank == args.rank and s.pp_rank == 0]
    shapes = {k: (v["shape"], DTYPES[v["dtype"]]) for f in files for k, v in read_header(f)[0].items()}
    params = {k: torch.empty(shape, dtype=dtype, device=device) for k, (shape, dtype) in shapes.items()}
    nbytes = sum(p.nbytes for p in params.values())
    for f in files:  # fill the page cache
        f.read_bytes()
    results = []

    def timed(name: str, fn) -> None:
        for _ in range(2):
            if device.type == "cuda":
                torch.cuda.synchronize()
            start = time.perf_counter()
            fn()
            if device.type == "cuda":
                torch.cuda.synchronize()
            seconds = time.perf_counter() - start
        results.append({"loader": name, "seconds": round(seconds, 3), "gbps": round(nbytes / seconds / 1e9, 2)})
        print(json.dumps(results[-1]), flush=True)

    def safetensors_read() -> None:  # as vLLM's sharded_state: get_tensor, then copy into the parameter
        for f in files:
            with safe_open(f, framework="pt") as st:
                for k in st.keys():
                    params[k].copy_(st.get_tensor(k))

    timed("safetensors get_tensor + copy_", safetensors_read)
    for threads in (8, 16):
        for chunk_mib in (16, 64):
            timed(f"fast threads={threads} chunk={chunk_mib}MiB",
                  lambda: load_files(files, dict(params), Staging(threads, chunk_mib * 2**20, device)))
    best = max(results[1:], key=lambda r: r["gbps"])
    threads, chunk_mib = (int(x) for x in re.findall(r"\d+", best["loader"]))
    set_cache(files, warm=False)
    start = time.perf_counter()
    load_files(files, dict(params), Staging(threads, chunk_mib * 2**20, device))
    if device.type == "cuda":
        torch.cuda.synchronize()
    cold = nbytes / (time.perf_counter() - start) / 1e9
    sizes = [f.stat().st_size for f in files]
    dd = sum(sizes) / sum(size / dd_gbps(f) for f, size in zip(files, sizes))  # total bytes / total seconds
    print(json.dumps({"device": str(device), "rank_bytes": nbytes, "warm": results,
                      "cold": {"loader": best["loader"], "gbps": round(cold, 2), "dd_gbps": round(dd, 2)}}))


if __name__ == "__main__":
    main()
