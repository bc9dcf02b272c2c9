"""Is it Python that caps the fast loader, or the host's memory? Times, in one
process on the files of scripts/staging_sweep.py (page cache warm, staging
pinned beforehand):

  dd        16 dd processes read the files out of the page cache: no Python
  pread     the same with 16 Python threads (os.preadv into pinned buffers)
  copies    1, 8 or 16 threads copy pinned buffers to the GPU, nothing read: torch's
            copy_ (as presharded.reader does) against the CUDA driver's
            cuMemcpyHtoDAsync called through ctypes (no dispatcher, no GIL held)
  pipeline  the loader's read loop with each way of copying, and with torch recording
            two events per thread over and over (torch_events) instead of a new one per chunk

    PYTHONPATH=. python3 scripts/copy_cost.py --work /root/sweep [--what dd,copies,pipeline]

Needs only torch and a GPU; prints one JSON line per measurement.
"""

import argparse
import ctypes
import os
import subprocess
import threading
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import torch

from presharded.reader import Reader, plan, read
from presharded.safetensors_layout import read_header
from read_ceiling import copies_only, pinned, pread_all, report, timed
from staging_sweep import make_files

CU_EVENT_DISABLE_TIMING = 0x2


class Driver:
    """The few CUDA driver calls a copy needs; ctypes drops the GIL while each runs."""

    def __init__(self) -> None:
        lib = ctypes.CDLL("libcuda.so.1")
        self.memcpy = lib.cuMemcpyHtoDAsync_v2
        self.memcpy.argtypes = [ctypes.c_uint64, ctypes.c_void_p, ctypes.c_size_t, ctypes.c_void_p]
        self.record, self.wait = lib.cuEventRecord, lib.cuEventSynchronize
        self.record.argtypes, self.wait.argtypes = [ctypes.c_void_p, ctypes.c_void_p], [ctypes.c_void_p]
        self.lib = lib
        self.context = ctypes.c_void_p()
        check(lib.cuCtxGetCurrent(ctypes.byref(self.context)))

    def enter(self) -> None:
        check(self.lib.cuCtxSetCurrent(self.context))

    def event(self) -> ctypes.c_void_p:
        ev = ctypes.c_void_p()
        check(self.lib.cuEventCreate(ctypes.byref(ev), CU_EVENT_DISABLE_TIMING))
        return ev


def check(rc: int) -> None:
    if rc:
        raise RuntimeError(f"CUDA driver error {rc}")


class DriverReader:
    """presharded.reader.Reader with its copies made through the driver."""

    def __init__(self, cu: Driver, buffers: list[torch.Tensor], device: torch.device) -> None:
        cu.enter()
        self.cu, self.buffers, self.turn = cu, buffers, 0
        self.stream = torch.cuda.Stream(device)
        self.handle = ctypes.c_void_p(self.stream.cuda_stream)
        self.events = [cu.event(), cu.event()]
        self.pending = [False, False]

    def read_and_copy(self, fd: int, lo: int, hi: int, parts: list) -> None:
        i, self.turn = self.turn, 1 - self.turn
        if self.pending[i]:
            check(self.cu.wait(self.events[i]))
        buf = self.buffers[i]
        view, done = memoryview(buf.numpy()), 0
        while done < hi - lo:
            done += os.preadv(fd, [view[done : hi - lo]], lo + done)
        base = buf.data_ptr()
        for p in parts:
            check(self.cu.memcpy(p.tensor.data_ptr(), base + p.start - lo, p.end - p.start, self.handle))
        check(self.cu.record(self.events[i], self.handle))
        self.pending[i] = True


class EventReusingReader(Reader):
    """presharded.reader.Reader recording two events over and over instead of a new one per chunk."""

    def read_and_copy(self, fd: int, lo: int, hi: int, parts: list) -> None:
        i, self.turn = self.turn, 1 - self.turn
        if self.events[i] is None:
            self.events[i] = torch.cuda.Event()
        else:
            self.events[i].synchronize()
        buf = self.buffers[i][: hi - lo]
        view, done = memoryview(buf.numpy()), 0
        while done < hi - lo:
            done += os.preadv(fd, [view[done:]], lo + done)
        with torch.cuda.stream(self.stream):
            for p in parts:
                p.tensor.copy_(buf[p.start - lo : p.end - lo], non_blocking=True)
            self.events[i].record(self.stream)


def read_driver(cu: Driver, work: list, buffers: list[torch.Tensor], threads: int) -> None:
    read(work, buffers, threads, torch.device("cuda", 0), reader=lambda pair, device: DriverReader(cu, pair, device))


def copies_driver(cu: Driver, flat: list[torch.Tensor], buffers: list[torch.Tensor], threads: int) -> None:
    chunk, buffers, local = buffers[0].numel(), list(buffers), threading.local()
    work = [(t, lo) for t in flat for lo in range(0, t.numel(), chunk)]
    gpu = torch.device("cuda", 0)

    def run(item) -> None:
        if not hasattr(local, "reader"):
            local.reader = DriverReader(cu, [buffers.pop(), buffers.pop()], gpu)
        r, (t, lo) = local.reader, item
        i, r.turn = r.turn, 1 - r.turn
        if r.pending[i]:
            check(cu.wait(r.events[i]))
        n = min(chunk, t.numel() - lo)
        check(cu.memcpy(t.data_ptr() + lo, r.buffers[i].data_ptr(), n, r.handle))
        check(cu.record(r.events[i], r.handle))
        r.pending[i] = True

    with ThreadPoolExecutor(threads) as pool:
        list(pool.map(run, work))


def dd_all(paths: list[Path], processes: int) -> None:
    per_file, mib = processes // len(paths), 16
    jobs = []
    for p in paths:
        blocks = -(-p.stat().st_size // (mib * 2**20))
        step = -(-blocks // per_file)
        for k in range(per_file):
            jobs.append(subprocess.Popen(["dd", f"if={p}", "of=/dev/null", f"bs={mib}M", f"skip={k * step}",
                                          f"count={step}", "status=none"]))
    for job in jobs:
        if job.wait():
            raise RuntimeError("dd failed")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--work", default="/root/sweep")
    parser.add_argument("--what", default="dd,copies,pipeline")
    args = parser.parse_args()
    paths = make_files(Path(args.work))
    nbytes = sum(p.stat().st_size for p in paths)
    for p in paths:
        p.read_bytes()
    torch.empty(1, device="cuda")
    cu = Driver()
    gpu = torch.device("cuda", 0)

    for _ in range(2 if "dd" in args.what else 0):
        report("dd", nbytes, timed(lambda: dd_all(paths, 16)), processes=16, chunk_mib=16)
        buffers = pinned(16, 16 * 2**20)
        report("pread", nbytes, timed(lambda: pread_all(paths, 16, 16 * 2**20, buffers)), threads=16, chunk_mib=16)
        del buffers

    params = {k: torch.empty(v["shape"], dtype=torch.bfloat16, device="cuda")
              for p in paths for k, v in read_header(p)[0].items()}
    weights = sum(t.nbytes for t in params.values())
    flat = [t.view(-1).view(torch.uint8) for t in params.values()]
    for threads, mib in ((16, 4), (16, 16), (8, 4), (1, 4)) if "copies" in args.what else ():
        buffers = pinned(2 * threads, mib * 2**20)
        report("copies", weights, timed(lambda: copies_only(flat, buffers, threads)), how="torch", threads=threads, chunk_mib=mib)
        report("copies", weights, timed(lambda: copies_driver(cu, flat, buffers, threads)), how="driver", threads=threads, chunk_mib=mib)
        del buffers
        torch._C._host_emptyCache()
    ways = {
        "torch": lambda work, buffers, threads: read(work, buffers, threads, gpu),
        "torch_events": lambda work, buffers, threads: read(work, buffers, threads, gpu, reader=EventReusingReader),
        "driver": lambda work, buffers, threads: read_driver(cu, work, buffers, threads),
    }
    for threads, mib in ((16, 16), (16, 64), (16, 32), (8, 64)):
        buffers = pinned(2 * threads, mib * 2**20)
        work = plan(paths, dict(params), mib * 2**20)
        for how in [*ways, *ways, *ways]:
            report("pipeline", weights, timed(lambda: ways[how](work, buffers, threads)), how=how, threads=threads, chunk_mib=mib)
        del buffers
        torch._C._host_emptyCache()
    copy = {k: torch.zeros_like(v) for k, v in params.items()}
    for v in params.values():
        v.zero_()
    read_driver(cu, plan(paths, dict(params), 4 * 2**20), pinned(32, 4 * 2**20), 16)
    read(plan(paths, dict(copy), 16 * 2**20), pinned(32, 16 * 2**20), 16, gpu)
    print({"same_bytes": all(torch.equal(copy[k].view(torch.int16), v.view(torch.int16)) for k, v in params.items())})


if __name__ == "__main__":
    main()
