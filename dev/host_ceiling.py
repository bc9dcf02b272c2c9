"""The host's ceilings for a pre-sharded checkpoint's ranks read at once:
what the loader at TP=N could reach at best on this machine.

For 1 and for every rank of CHECKPOINT together (one process per rank, each on
its own GPU, started together behind a barrier):

  h2d       pinned host memory -> this rank's GPU, 16 MiB copies, 4 GiB in all
  pread     this rank's files, in the page cache -> pinned buffers, 16 MiB chunks,
            THREADS threads per rank, nothing sent to the GPU
  both      the two at once, each on its own (h2d from buffers of its own, as many bytes as the
            files): what memory carries when the loader's two streams share it; `gbps` is the
            files' bytes over the time both took, the most a loader that overlaps them could reach
  dd        this rank's files read cold by `dd` (the page cache dropped first), all ranks at once

    PYTHONPATH=. python3 dev/host_ceiling.py /root/bench/tp2 --threads 16

Needs torch and a GPU per rank; prints one JSON line per measurement and rank.
"""

import argparse
import json
import os
import subprocess
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import torch
import torch.multiprocessing as mp

from presharded.manifest import read_manifest

CHUNK = 16 * 2**20


def rank_files(checkpoint: Path, rank: int) -> list[Path]:
    return [checkpoint / s.path for s in read_manifest(checkpoint).shards if s.tp_rank == rank and s.pp_rank == 0]


def pread_all(paths: list[Path], threads: int, buffers: list[torch.Tensor]) -> int:
    work = [(p, lo, min(CHUNK, p.stat().st_size - lo)) for p in paths for lo in range(0, p.stat().st_size, CHUNK)]
    fds = {p: os.open(p, os.O_RDONLY) for p in paths}

    def run(i: int) -> None:
        view = memoryview(buffers[i].numpy())
        for path, lo, n in work[i::threads]:
            done = 0
            while done < n:
                done += os.preadv(fds[path], [view[done:n]], lo + done)

    with ThreadPoolExecutor(threads) as pool:
        list(pool.map(run, range(threads)))
    for fd in fds.values():
        os.close(fd)
    return sum(n for _, _, n in work)


def h2d(dest: torch.Tensor, sources: list[torch.Tensor], nbytes: int) -> int:
    """`nbytes` copied from pinned `sources` to the GPU, 16 MiB at a time, over and over `dest`."""
    torch.cuda.set_device(dest.device)  # a pool's thread starts on GPU 0
    for i, lo in enumerate(range(0, nbytes, CHUNK)):
        at = lo % dest.numel()
        n = min(CHUNK, nbytes - lo, dest.numel() - at)
        dest[at : at + n].copy_(sources[i % len(sources)][:n], non_blocking=True)
    torch.cuda.synchronize()
    return nbytes


def measure(rank: int, ranks: int, checkpoint: str, threads: int, barrier, results) -> None:
    torch.cuda.set_device(rank)
    paths = rank_files(Path(checkpoint), rank)
    buffers = [torch.empty(CHUNK, dtype=torch.uint8, pin_memory=True) for _ in range(threads)]
    dest = torch.empty(4 * 2**30, dtype=torch.uint8, device="cuda")
    sources = [torch.empty(CHUNK, dtype=torch.uint8, pin_memory=True) for _ in range(2)]
    for what in ("h2d", "pread", "both"):
        barrier.wait()
        torch.cuda.synchronize()
        start = time.perf_counter()
        if what == "h2d":
            nbytes = h2d(dest, sources, dest.numel())
        elif what == "pread":
            nbytes = pread_all(paths, threads, buffers)
        else:
            with ThreadPoolExecutor(1) as pool:
                copied = pool.submit(h2d, dest, sources, sum(p.stat().st_size for p in paths))
                nbytes = pread_all(paths, threads, buffers)
                copied.result()
        seconds = time.perf_counter() - start
        results.put({"what": what, "ranks": ranks, "rank": rank, "threads": threads, "bytes": nbytes,
                     "seconds": round(seconds, 3), "gbps": round(nbytes / seconds / 1e9, 2)})


def dd_cold(checkpoint: Path, ranks: int) -> list[dict]:
    files = [rank_files(checkpoint, rank)[0] for rank in range(ranks)]
    for f in files:
        fd = os.open(f, os.O_RDONLY)
        os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
        os.close(fd)
    procs = [subprocess.Popen(["dd", f"if={f}", "of=/dev/null", "bs=64M"], stderr=subprocess.PIPE, text=True)
             for f in files]
    return [{"what": "dd", "ranks": ranks, "rank": rank, "file": files[rank].name,
             "dd_says": p.communicate()[1].strip().splitlines()[-1]} for rank, p in enumerate(procs)]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("checkpoint", type=Path)
    parser.add_argument("--threads", type=int, default=16)
    args = parser.parse_args()
    manifest = read_manifest(args.checkpoint)
    tp = manifest.tensor_parallel_size
    for rank in range(tp):  # into the page cache
        for f in rank_files(args.checkpoint, rank):
            subprocess.run(["cat", str(f)], stdout=subprocess.DEVNULL, check=True)
    ctx = mp.get_context("spawn")
    for ranks in sorted({1, tp}):
        barrier, results = ctx.Barrier(ranks), ctx.Queue()
        procs = [ctx.Process(target=measure, args=(r, ranks, str(args.checkpoint), args.threads, barrier, results))
                 for r in range(ranks)]
        for p in procs:
            p.start()
        for _ in range(3 * ranks):
            print(json.dumps(results.get()), flush=True)
        for p in procs:
            p.join()
    for ranks in sorted({1, tp}):
        for line in dd_cold(args.checkpoint, ranks):
            print(json.dumps(line), flush=True)


if __name__ == "__main__":
    main()
