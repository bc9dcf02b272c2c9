"""How should the fast loader stage bytes on their way to the GPU? Each method
reads the same 15.5 GB of safetensors files (tensors of a Llama-3-8B rank's
sizes) into GPU tensors in a fresh process, twice: the first load pays for
setting up staging memory, as a loader inside a new vLLM worker does.

  pinned    bounce buffers from torch's pinned allocator (cudaHostAlloc), as
            presharded.reader.Staging makes them
  register  pageable bounce buffers, pinned with cudaHostRegister (and unpinned after)
  mmap      no bounce buffer: each chunk of the file's page-cache mapping is
            pinned read-only with cudaHostRegister and copied from directly

    PYTHONPATH=. python3 scripts/staging_sweep.py --work /root/sweep

Needs only torch and a GPU; prints one JSON line per run.
"""

import argparse
import ctypes
import json
import mmap
import os
import subprocess
import sys
import threading
import time
from pathlib import Path

import torch
from safetensors.torch import save_file

from presharded import reader
from presharded.reader import Staging, load_files
from presharded.safetensors_layout import Segment, read_header

CUDA_HOST_REGISTER_READ_ONLY = 0x08
LAYER_MB = [32, 8, 8, 32, 117, 117, 117]  # q, k, v, o, gate, up, down of a Llama-3-8B layer


def make_files(work: Path) -> list[Path]:
    work.mkdir(parents=True, exist_ok=True)
    paths = [work / f"part-{i}.safetensors" for i in range(4)]
    for i, path in enumerate(paths):
        if not path.exists():
            tensors = {f"l{layer}.t{j}": torch.randint(-2**15, 2**15, (mb * 2**19,), dtype=torch.int16,
                                                       device="cuda").view(torch.bfloat16).cpu()
                       for layer in range(9 * i, 9 * i + 9) for j, mb in enumerate(LAYER_MB)}
            save_file(tensors, path)
    return paths


def checksum(params: dict[str, torch.Tensor]) -> int:
    total = 0
    for name in sorted(params):
        v = params[name].view(torch.int32)
        total = (total * 31 + int(v.sum(dtype=torch.int64)) + int(v[::997].sum(dtype=torch.int64))) % 2**61
    return total


class RegisterReader(reader.Reader):
    """Pageable bounce buffers, pinned in place (and unpinned after the load)."""

    registered: list[int] = []

    def __init__(self, buffers: list[torch.Tensor], device: torch.device) -> None:
        super().__init__(buffers, device)
        for b in self.buffers:
            check(torch.cuda.cudart().cudaHostRegister(b.data_ptr(), b.nbytes, 0), "cudaHostRegister")
            RegisterReader.registered.append(b.data_ptr())


class MmapReader:
    """No bounce buffer: copies straight out of the file's pinned mapping."""

    maps: dict[int, tuple[mmap.mmap, int]] = {}
    lock = threading.Lock()
    registered: set[int] = set()

    def __init__(self, buffers: list[torch.Tensor], device: torch.device) -> None:
        self.stream = torch.cuda.Stream(device)
        self.previous: tuple[torch.cuda.Event, int] | None = None

    def address(self, fd: int) -> int:
        with MmapReader.lock:
            if fd not in MmapReader.maps:
                m = mmap.mmap(fd, 0, prot=mmap.PROT_READ)
                MmapReader.maps[fd] = (m, _map_address(m))
            return MmapReader.maps[fd][1]

    def read_and_copy(self, fd: int, lo: int, hi: int, parts: list[Segment]) -> None:
        base = self.address(fd)
        page = mmap.PAGESIZE
        alo, ahi = (base + lo) // page * page, -(-(base + hi) // page) * page
        check(torch.cuda.cudart().cudaHostRegister(alo, ahi - alo, CUDA_HOST_REGISTER_READ_ONLY), "cudaHostRegister")
        with MmapReader.lock:
            MmapReader.registered.add(alo)
        src = torch.frombuffer((ctypes.c_char * (hi - lo)).from_address(base + lo), dtype=torch.uint8)
        with torch.cuda.stream(self.stream):
            for p in parts:
                p.tensor.copy_(src[p.start - lo: p.end - lo], non_blocking=True)
            event = torch.cuda.Event()
            event.record(self.stream)
        if self.previous is not None:
            self.previous[0].synchronize()
            check(torch.cuda.cudart().cudaHostUnregister(self.previous[1]), "cudaHostUnregister")
            with MmapReader.lock:
                MmapReader.registered.discard(self.previous[1])
        self.previous = (event, alo)


def _map_address(m: mmap.mmap) -> int:
    # a read-only mmap refuses ctypes.from_buffer; numpy reads the address without writing
    import numpy as np

    return np.frombuffer(m, dtype=np.uint8).ctypes.data


def check(err, what: str) -> None:
    code = int(getattr(err, "value", err))
    if code != 0:
        raise RuntimeError(f"{what} failed with CUDA error {code}")


def finish(method: str) -> None:
    torch.cuda.synchronize()
    if method == "mmap":
        for addr in MmapReader.registered:
            check(torch.cuda.cudart().cudaHostUnregister(addr), "cudaHostUnregister")
        MmapReader.registered.clear()
    if method == "register":
        for addr in RegisterReader.registered:
            check(torch.cuda.cudart().cudaHostUnregister(addr), "cudaHostUnregister")
        RegisterReader.registered.clear()


def one_method(args: argparse.Namespace) -> None:
    paths = sorted(Path(args.work).glob("part-*.safetensors"))
    device, cpu = torch.device("cuda"), torch.device("cpu")
    torch.cuda.init()
    torch.empty(1, device=device)
    params = {k: torch.empty(v["shape"], dtype=torch.bfloat16, device=device)
              for p in paths for k, v in read_header(p)[0].items()}
    nbytes = sum(t.nbytes for t in params.values())
    reader.Reader = {"pinned": reader.Reader, "register": RegisterReader, "mmap": MmapReader}[args.method]
    runs = []
    for _ in range(args.runs):
        torch.cuda.synchronize()
        start = time.perf_counter()
        # pinned buffers for `pinned`; pageable ones (pinned by RegisterReader, unused by MmapReader) otherwise
        staging = Staging(args.threads, args.chunk_mib * 2**20, device if args.method == "pinned" else cpu)
        load_files(paths, dict(params), staging)
        finish(args.method)
        runs.append(time.perf_counter() - start)
    print(json.dumps({"method": args.method, "threads": args.threads, "chunk_mib": args.chunk_mib,
                      "cache": args.cache, "bytes": nbytes, "seconds": [round(s, 3) for s in runs],
                      "gbps": [round(nbytes / s / 1e9, 2) for s in runs], "checksum": checksum(params)}), flush=True)


def drop_cache(paths: list[Path]) -> None:
    for p in paths:
        fd = os.open(p, os.O_RDONLY)
        os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
        os.close(fd)
    Path("/proc/sys/vm/drop_caches").write_text("1")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--work", default="/root/sweep")
    parser.add_argument("--method")
    parser.add_argument("--threads", type=int, default=16)
    parser.add_argument("--chunk-mib", type=int, default=64)
    parser.add_argument("--runs", type=int, default=2)
    parser.add_argument("--cache", default="warm")
    args = parser.parse_args()
    if args.method:
        return one_method(args)
    paths = make_files(Path(args.work))
    runs = [("pinned", 16, 64), ("pinned", 16, 16), ("register", 16, 64), ("register", 16, 16),
            ("mmap", 16, 64), ("mmap", 32, 64), ("mmap", 16, 256)]
    for method, threads, chunk in runs:
        for p in paths:
            p.read_bytes()
        cmd = [sys.executable, __file__, "--work", args.work, "--method", method,
               "--threads", str(threads), "--chunk-mib", str(chunk)]
        proc = subprocess.run(cmd, capture_output=True, text=True)
        print(proc.stdout.strip() or f"{method} failed: {proc.stderr[-2000:]}", flush=True)
    for method in ("pinned", "mmap"):
        drop_cache(paths)
        cmd = [sys.executable, __file__, "--work", args.work, "--method", method, "--runs", "1", "--cache", "cold"]
        proc = subprocess.run(cmd, capture_output=True, text=True)
        print(proc.stdout.strip() or f"{method} cold failed: {proc.stderr[-2000:]}", flush=True)
    drop_cache(paths)
    start = time.perf_counter()
    for p in paths:
        subprocess.run(["dd", f"if={p}", "of=/dev/null", "bs=64M"], capture_output=True)
    seconds = time.perf_counter() - start
    print(json.dumps({"method": "dd", "cache": "cold", "seconds": round(seconds, 3),
                      "gbps": round(sum(p.stat().st_size for p in paths) / seconds / 1e9, 2)}), flush=True)


if __name__ == "__main__":
    main()
