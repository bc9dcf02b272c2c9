"""Reads safetensors files straight into existing tensors, fast.

Each file's data is read in large chunks by a few threads with pread (or, in
S3, ranged GETs: presharded/s3.py), each into one of its own two staging
buffers (pinned, for a GPU), and copied from there asynchronously straight
into the parameters, so reading, copying and the next read overlap. Host
memory stays bounded (threads x 2 buffers), never a second copy of the
model. Every tensor must match its destination exactly: no silent
narrowing."""

import mmap
import os
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import torch

from presharded.errors import UserError
from presharded.safetensors_layout import DTYPES, Segment, chunks, flat_bytes, parse_header, read_header

File = Path  # or an S3Object of presharded/s3.py: `name`, `size`, `read` and `read_into` at an offset


class Opened:
    """A file on disk, open for reading into buffers at any offset."""

    def __init__(self, path: Path) -> None:
        self.fd = os.open(path, os.O_RDONLY)

    def read_into(self, view: memoryview, offset: int) -> None:
        done = 0
        while done < len(view):
            n = os.preadv(self.fd, [view[done:]], offset + done)
            if n == 0:
                raise UserError(f"unexpected end of file at byte {offset + done}: the file is truncated")
            done += n


def plan_file(path: File, params: dict[str, torch.Tensor], skip: frozenset[str] = frozenset()) -> list[Segment]:
    header, data_start = read_header(path) if isinstance(path, Path) else parse_header(path.url, path.size, path.read)
    segments = []
    for name, info in header.items():
        if name in skip:
            continue
        if name not in params:
            raise UserError(f"{path.name} holds {name}, which this model does not have: saved from another model?")
        param = params.pop(name)
        shape, dtype = list(param.shape), param.dtype
        if info["shape"] != shape or DTYPES.get(info["dtype"]) != dtype:
            raise UserError(
                f"{path.name}: {name} is {info['dtype']}{info['shape']}, the model expects {dtype}{shape}; "
                "load with the layout, dtype and quantization it was saved for"
            )
        if not param.is_contiguous():
            raise UserError(f"{name} is not contiguous in this model; load with --load-format sharded_state")
        begin, end = info["data_offsets"]
        if end - begin != param.nbytes:
            raise UserError(f"{path.name}: {name} holds {end - begin} bytes, its shape and dtype {param.nbytes}; "
                            "copy it again, or save again")
        segments.append(Segment(data_start + begin, data_start + end, flat_bytes(param)))
    return sorted(segments, key=lambda s: s.start)


class Staging:
    """Two buffers per reading thread, in one anonymous mapping, pinned in place
    (cudaHostRegister) when the weights go to a GPU. Not torch's pinned
    allocator: its cudaHostAlloc holds up every GPU allocation while it runs,
    so pinning 2 GiB beside vLLM building the model delayed that by as long as
    the pinning took (0.86-0.91 s), where touching and registering a mapping
    pinned it in 0.53-0.56 s and delayed nothing (dev/pin_cost.py). It
    runs on a thread of its own from the moment the loader exists."""

    def __init__(self, threads: int, chunk_size: int, device: torch.device) -> None:
        self.threads, self.chunk_size, self.device = threads, chunk_size, device
        self.area: mmap.mmap | None = None
        self.pinned = 0  # the address cudaHostRegister pinned, if it did
        pool = ThreadPoolExecutor(1)
        self._buffers = pool.submit(self._allocate, 2 * threads, chunk_size)
        pool.shutdown(wait=False)

    def _allocate(self, count: int, size: int) -> list[torch.Tensor]:
        self.area = mmap.mmap(-1, count * size)
        whole = torch.frombuffer(self.area, dtype=torch.uint8)
        whole.fill_(0)  # fault every page in now, not during the read
        if self.device.type == "cuda":
            torch.cuda.set_device(self.device)  # a new thread starts on GPU 0
            rc = torch.cuda.cudart().cudaHostRegister(whole.data_ptr(), whole.nbytes, 0)
            if int(rc) != 0:  # a cudaError enum, true even when it is success
                raise RuntimeError(f"pinning {whole.nbytes} bytes of staging failed: CUDA error {rc}")
            self.pinned = whole.data_ptr()
        return list(whole.split(size))

    def take(self) -> list[torch.Tensor]:
        start = time.perf_counter()
        buffers, self._buffers = self._buffers.result(), None
        self.waited = time.perf_counter() - start
        return buffers

    def release(self) -> None:
        """Unpins and unmaps the buffers, once any copy out of them has finished."""
        start = time.perf_counter()
        if self._buffers is not None:
            self._buffers.exception()  # never taken: wait for the allocation to end
            self._buffers = None
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
        if self.pinned:
            torch.cuda.cudart().cudaHostUnregister(self.pinned)
            self.pinned = 0
        if self.area is not None:
            try:
                self.area.close()
                self.area = None
            except BufferError:  # a failed read's traceback still holds a buffer: unmapped when it goes
                pass
        self.released = time.perf_counter() - start


class Reader:
    """One thread's two staging buffers, stream and events."""

    def __init__(self, buffers: list[torch.Tensor], device: torch.device) -> None:
        self.cuda = device.type == "cuda"
        if self.cuda:  # a new thread starts on GPU 0: on any other rank it would make a context there too
            torch.cuda.set_device(device)
        self.buffers = buffers
        self.events = [None, None]
        self.stream = torch.cuda.Stream(device) if self.cuda else None
        self.turn = 0

    def read_and_copy(self, source, lo: int, hi: int, parts: list[Segment]) -> None:
        i, self.turn = self.turn, 1 - self.turn
        if self.events[i] is not None:
            self.events[i].synchronize()  # the copy out of this buffer has finished
        buf = self.buffers[i][: hi - lo]
        source.read_into(memoryview(buf.numpy()), lo)
        if self.cuda:
            with torch.cuda.stream(self.stream):
                for p in parts:
                    p.tensor.copy_(buf[p.start - lo : p.end - lo], non_blocking=True)
                self.events[i] = torch.cuda.Event()
                self.events[i].record(self.stream)
        else:
            for p in parts:
                p.tensor.copy_(buf[p.start - lo : p.end - lo])


Chunk = tuple[File, int, int, list[Segment]]  # a file, bytes [lo, hi) of it, and the pieces of tensors there


def load_files(paths: list[File], params: dict[str, torch.Tensor], staging: Staging,
               skip: frozenset[str] = frozenset()) -> int:
    """Read every file into `params` (all on one device), but for the tensors named in `skip`;
    returns the bytes read. Releases the staging buffers, whatever happens."""
    device = next(iter(params.values())).device
    try:
        work = read_plan(paths, params, staging.chunk_size, skip)
        return read(work, staging.take(), staging.threads, device)
    finally:
        staging.release()


def read_plan(paths: list[File], params: dict[str, torch.Tensor], chunk_size: int,
         skip: frozenset[str] = frozenset()) -> list[Chunk]:
    """Every file's chunks; each of `params` must be filled exactly once (they are taken out of it)."""
    work = []
    for path in paths:
        work += [(path, lo, hi, parts) for lo, hi, parts in chunks(plan_file(path, params, skip), chunk_size)]
    if params:
        raise UserError(f"the checkpoint lacks {len(params)} tensors, e.g. {next(iter(params))}; save it again")
    return work


def read(work: list[Chunk], buffers: list[torch.Tensor], threads: int, device: torch.device) -> int:
    """`threads` readers (two of `buffers` each) read and copy the chunks; returns the bytes read."""
    buffers, local = list(buffers), threading.local()
    readers: list[Reader] = []  # held until the final synchronize: copies out of their buffers may be in flight

    def run(item: Chunk) -> None:
        if not hasattr(local, "reader"):
            local.reader = Reader([buffers.pop(), buffers.pop()], device)
            readers.append(local.reader)
        path, lo, hi, parts = item
        local.reader.read_and_copy(sources[path], lo, hi, parts)

    files = {path for path, *_ in work}
    sources = {path: Opened(path) if isinstance(path, Path) else path for path in files}
    try:
        with ThreadPoolExecutor(threads) as pool:
            list(pool.map(run, work))
        if device.type == "cuda":
            torch.cuda.synchronize(device)
    finally:
        for source in sources.values():
            if isinstance(source, Opened):
                os.close(source.fd)
    return sum(hi - lo for _, lo, hi, _ in work)
