"""Does our reader fill GPU 1 as fast as GPU 0? At TP=2 rank 1 read slower
than rank 0 in every start (docs/benchmark.md, "Two GPUs"). A thread starts
on GPU 0, and the reader's threads did not say otherwise: in rank 1's process
they would make a CUDA context on GPU 0 and switch devices at every chunk.

Writes one safetensors file of GIB GiB per GPU (in the page cache), then for
the reader as it was (threads left on GPU 0) and as it is (threads set to the
rank's GPU): one process per GPU, as vLLM's workers (their device set), GPU 1
alone and both GPUs at once behind a barrier, three loads each. Prints one
JSON line per load, and which GPUs each process holds a context on (nvidia-smi).

    PYTHONPATH=. python3 dev/reader_device.py /root/probe --gib 8
"""

import argparse
import json
import os
import subprocess
import time
from pathlib import Path

import torch
import torch.multiprocessing as mp
from safetensors.torch import save_file

from presharded import reader
from presharded.reader import Staging, load_files

ELEMENTS_PER_GIB = 2**29  # bf16


def old_init(self, buffers: list[torch.Tensor], device: torch.device) -> None:
    """reader.Reader.__init__ before the fix: no torch.cuda.set_device."""
    self.cuda = device.type == "cuda"
    self.buffers = buffers
    self.events = [None, None]
    self.stream = torch.cuda.Stream(device) if self.cuda else None
    self.turn = 0


def contexts(pid: int) -> list[str]:
    out = subprocess.run(["nvidia-smi", "--query-compute-apps=pid,gpu_uuid,used_memory", "--format=csv,noheader"],
                         capture_output=True, text=True).stdout
    return [line for line in out.splitlines() if line.split(",")[0].strip() == str(pid)]


def measure(index: int, path: str, gib: int, old: bool, together: int, barrier, results) -> None:
    torch.cuda.set_device(index)  # as vLLM's worker does
    device = torch.device("cuda", index)
    if old:
        reader.Reader.__init__ = old_init
    param = torch.empty(gib * ELEMENTS_PER_GIB, dtype=torch.bfloat16, device=device)
    for repeat in range(3):
        staging = Staging(16, 16 * 2**20, device)
        staging._buffers.exception()  # pinned before the clock starts
        barrier.wait()
        start, started = time.perf_counter(), time.time()
        nbytes = load_files([Path(path)], {"w": param}, staging)
        seconds = time.perf_counter() - start
        results.put({"reader": "old" if old else "new", "gpus_at_once": together, "gpu": index, "repeat": repeat,
                     "started": started, "seconds": round(seconds, 3), "gbps": round(nbytes / seconds / 1e9, 2),
                     "contexts": contexts(os.getpid()) if repeat == 2 else None})


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("folder", type=Path)
    parser.add_argument("--gib", type=int, default=8)
    args = parser.parse_args()
    args.folder.mkdir(parents=True, exist_ok=True)
    paths = []
    for index in range(2):
        path = args.folder / f"gpu{index}.safetensors"
        if not path.exists():
            save_file({"w": torch.zeros(args.gib * ELEMENTS_PER_GIB, dtype=torch.bfloat16)}, path)
        subprocess.run(["cat", str(path)], stdout=subprocess.DEVNULL, check=True)
        paths.append(str(path))
    ctx = mp.get_context("spawn")
    for old in (True, False):
        for gpus in ([1], [0, 1]):
            barrier, results = ctx.Barrier(len(gpus)), ctx.Queue()
            procs = [ctx.Process(target=measure, args=(i, paths[i], args.gib, old, len(gpus), barrier, results))
                     for i in gpus]
            for p in procs:
                p.start()
            for _ in range(3 * len(gpus)):
                print(json.dumps(results.get()), flush=True)
            for p in procs:
                p.join()


if __name__ == "__main__":
    main()
