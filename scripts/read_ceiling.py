"""What caps the fast loader's warm read? Takes the pipeline apart on the
files of scripts/staging_sweep.py (a Llama-3-8B rank's tensor sizes, in the
page cache) and times each piece alone, in one process, staging pinned
beforehand (so no piece pays for pinning):

  memcpy    host memory bandwidth: torch copies a 4 GiB pageable tensor into another
  pread     page cache -> pinned buffers, N threads, nothing sent to the GPU
  h2d       pinned buffers -> GPU, nothing read, from S streams
  copies    the reader's CUDA calls alone: N threads copy their buffers out, no reads
  pipeline  both, overlapped: `reader` as presharded.reader runs it (each thread reads
            and copies), `queued` with readers that only read and one thread that
            makes every CUDA call
  hybrid    S threads read through pinned buffers while D threads copy straight out
            of the page cache (pinned in place, chunk by chunk), all taking chunks
            from one queue: a byte sent the second way crosses host memory once

    PYTHONPATH=. python3 scripts/read_ceiling.py --work /root/sweep [--what hybrid]

Needs only torch and a GPU; prints one JSON line per measurement.
"""

import argparse
import json
import os
import queue
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import torch

from presharded.reader import Reader, plan, read
from presharded.safetensors_layout import read_header
from staging_sweep import MmapReader, finish, make_files


def timed(fn) -> float:
    torch.cuda.synchronize()
    start = time.perf_counter()
    fn()
    torch.cuda.synchronize()
    return time.perf_counter() - start


def pinned(count: int, size: int) -> list[torch.Tensor]:
    return [torch.empty(size, dtype=torch.uint8, pin_memory=True) for _ in range(count)]


def pread_all(paths: list[Path], threads: int, chunk: int, buffers: list[torch.Tensor]) -> int:
    work = [(p, lo, min(chunk, p.stat().st_size - lo)) for p in paths for lo in range(0, p.stat().st_size, chunk)]
    fds = {p: os.open(p, os.O_RDONLY) for p in paths}
    free, local = list(buffers), threading.local()

    def run(item: tuple[Path, int, int]) -> None:
        if not hasattr(local, "view"):
            local.view = memoryview(free.pop().numpy())
        path, lo, n = item
        done = 0
        while done < n:
            done += os.preadv(fds[path], [local.view[done:n]], lo + done)

    with ThreadPoolExecutor(threads) as pool:
        list(pool.map(run, work))
    for fd in fds.values():
        os.close(fd)
    return sum(n for _, _, n in work)


def h2d_all(nbytes: int, streams: int, buffers: list[torch.Tensor], dest: torch.Tensor) -> None:
    chunk = buffers[0].numel()
    pool = [torch.cuda.Stream() for _ in range(streams)]
    for i, lo in enumerate(range(0, nbytes - chunk + 1, chunk)):
        with torch.cuda.stream(pool[i % streams]):
            dest[lo : lo + chunk].copy_(buffers[i % len(buffers)], non_blocking=True)


def report(what: str, nbytes: int, seconds: float, **kw) -> None:
    print(json.dumps({"what": what, **kw, "bytes": nbytes, "seconds": round(seconds, 3),
                      "gbps": round(nbytes / seconds / 1e9, 2)}), flush=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--work", default="/root/sweep")
    parser.add_argument("--what", default="memcpy,pread,h2d,copies,pipeline,hybrid")
    args = parser.parse_args()
    what = args.what.split(",")
    paths = make_files(Path(args.work))
    nbytes = sum(p.stat().st_size for p in paths)
    for p in paths:
        p.read_bytes()  # into the page cache
    torch.empty(1, device="cuda")

    if "memcpy" in what:
        torch.set_num_threads(os.cpu_count() or 1)
        a, b = torch.ones(2**32, dtype=torch.uint8), torch.empty(2**32, dtype=torch.uint8)
        b.copy_(a)
        report("memcpy", a.nbytes, timed(lambda: b.copy_(a)), threads=torch.get_num_threads())
        del a, b

    chunk = 16 * 2**20
    buffers = pinned(64, chunk)
    for threads in (4, 8, 16, 32, 64) if "pread" in what else ():
        report("pread", nbytes, timed(lambda: pread_all(paths, threads, chunk, buffers)), threads=threads, chunk_mib=16)
    for mib in (1, 2, 4) if "pread" in what else ():  # buffers small enough to stay in the CPU's last-level cache
        small = [b[: mib * 2**20] for b in buffers]
        report("pread", nbytes, timed(lambda: pread_all(paths, 16, mib * 2**20, small)), threads=16, chunk_mib=mib)

    dest = torch.empty(nbytes, dtype=torch.uint8, device="cuda")
    for streams in (1, 2, 4, 16) if "h2d" in what else ():
        report("h2d", nbytes, timed(lambda: h2d_all(nbytes, streams, buffers[:32], dest)), streams=streams, chunk_mib=16)
    del dest, buffers

    params = {k: torch.empty(v["shape"], dtype=torch.bfloat16, device="cuda")
              for p in paths for k, v in read_header(p)[0].items()}
    weights = sum(t.nbytes for t in params.values())
    gpu = torch.device("cuda", 0)
    for threads, chunk_mib in ((16, 16), (16, 4), (8, 4)) if "copies" in what else ():
        buffers = pinned(2 * threads, chunk_mib * 2**20)
        flat = [t.view(-1).view(torch.uint8) for t in params.values()]
        report("copies", weights, timed(lambda: copies_only(flat, buffers, threads)), threads=threads, chunk_mib=chunk_mib)
        del buffers
    for threads, chunk_mib in ((16, 16), (16, 4), (8, 4), (8, 8), (16, 8), (16, 64)) if "pipeline" in what else ():
        for how in ("reader", "queued"):
            buffers = pinned(2 * threads, chunk_mib * 2**20)
            work = plan(paths, dict(params), chunk_mib * 2**20)
            run = lambda: read(work, buffers, threads, gpu) if how == "reader" else load_queued(work, buffers, threads)
            run()
            report("pipeline", weights, timed(run), how=how, threads=threads, chunk_mib=chunk_mib)
            del buffers
            torch._C._host_emptyCache()
    hybrids = [(16, 0, 16), (12, 4, 16), (16, 4, 16), (12, 8, 16), (16, 8, 16), (8, 8, 16),
               (16, 0, 64), (12, 4, 64), (16, 8, 64), (16, 16, 64), (16, 0, 16)]
    for staged, direct, chunk_mib in hybrids if "hybrid" in what else ():
        buffers = pinned(2 * staged, chunk_mib * 2**20)
        work = plan(paths, dict(params), chunk_mib * 2**20)
        load_hybrid(work, buffers, staged, direct)
        report("hybrid", weights, timed(lambda: load_hybrid(work, buffers, staged, direct)),
               staged=staged, direct=direct, chunk_mib=chunk_mib)
        del buffers
        torch._C._host_emptyCache()


def copies_only(flat: list[torch.Tensor], buffers: list[torch.Tensor], threads: int) -> None:
    """The reader's CUDA calls without its reads: each thread copies its two buffers out in turn."""
    chunk, buffers = buffers[0].numel(), list(buffers)
    work = [(t, lo) for t in flat for lo in range(0, t.numel(), chunk)]
    local = threading.local()

    def run(item: tuple[torch.Tensor, int]) -> None:
        if not hasattr(local, "reader"):
            local.reader = Reader([buffers.pop(), buffers.pop()], torch.device("cuda", 0))
        t, lo = item
        r = local.reader
        i, r.turn = r.turn, 1 - r.turn
        if r.events[i] is not None:
            r.events[i].synchronize()
        n = min(chunk, t.numel() - lo)
        with torch.cuda.stream(r.stream):
            t[lo : lo + n].copy_(r.buffers[i][:n], non_blocking=True)
            r.events[i] = torch.cuda.Event()
            r.events[i].record(r.stream)

    with ThreadPoolExecutor(threads) as pool:
        list(pool.map(run, work))


def load_queued(work: list, buffers: list[torch.Tensor], threads: int) -> None:
    """Readers only read; one thread makes every CUDA call, on one stream."""
    free: queue.Queue = queue.Queue()
    for b in buffers:
        free.put((b, None))
    ready: queue.Queue = queue.Queue()
    fds = {path: os.open(path, os.O_RDONLY) for path in {w[0] for w in work}}
    stream = torch.cuda.Stream()

    def read(item) -> None:
        path, lo, hi, parts = item
        buf, event = free.get()
        if event is not None:
            event.synchronize()
        view, done = memoryview(buf.numpy()), 0
        while done < hi - lo:
            done += os.preadv(fds[path], [view[done : hi - lo]], lo + done)
        ready.put((buf, lo, parts))

    def copy() -> None:
        with torch.cuda.stream(stream):
            for _ in range(len(work)):
                buf, lo, parts = ready.get()
                for p in parts:
                    p.tensor.copy_(buf[p.start - lo : p.end - lo], non_blocking=True)
                event = torch.cuda.Event()
                event.record(stream)
                free.put((buf, event))

    copier = threading.Thread(target=copy)
    copier.start()
    with ThreadPoolExecutor(threads) as pool:
        list(pool.map(read, work))
    copier.join()
    torch.cuda.synchronize()
    for fd in fds.values():
        os.close(fd)


def load_hybrid(work: list, buffers: list[torch.Tensor], staged: int, direct: int) -> None:
    gpu = torch.device("cuda", 0)
    readers = [Reader(buffers[2 * i : 2 * i + 2], gpu) for i in range(staged)] + [MmapReader([], gpu) for _ in range(direct)]
    items, lock = iter(work), threading.Lock()
    fds = {path: os.open(path, os.O_RDONLY) for path in {w[0] for w in work}}

    def run(reader) -> None:
        while True:
            with lock:
                item = next(items, None)
            if item is None:
                return
            path, lo, hi, parts = item
            reader.read_and_copy(fds[path], lo, hi, parts)

    with ThreadPoolExecutor(len(readers)) as pool:
        list(pool.map(run, readers))
    finish("mmap")  # synchronizes, then unpins the page cache
    MmapReader.maps.clear()  # its keys are fds, which the next run's open may reuse
    for fd in fds.values():
        os.close(fd)


if __name__ == "__main__":
    main()
