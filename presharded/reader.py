"""Reads safetensors files straight into existing tensors, fast.

Each file's data is read in large chunks by a few threads with pread, each
into one of its own two (pinned) staging buffers, and copied from there
asynchronously straight into the parameters, so reading, copying and the
next read overlap. Host memory stays bounded (threads x 2 buffers), never a
second copy of the model. Every tensor must match its
destination exactly: no silent narrowing."""

import json
import os
import struct
import threading
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import torch

from presharded.errors import UserError

DTYPES = {"BF16": torch.bfloat16, "F16": torch.float16, "F32": torch.float32, "F64": torch.float64,
          "I8": torch.int8, "U8": torch.uint8, "I16": torch.int16, "I32": torch.int32, "I64": torch.int64,
          "BOOL": torch.bool, "F8_E4M3": torch.float8_e4m3fn, "F8_E5M2": torch.float8_e5m2}


@dataclass
class Segment:
    """Bytes [start, end) of a file that belong in `dest` (a flat uint8 view)."""

    start: int
    end: int
    dest: torch.Tensor


def read_header(path: Path) -> tuple[dict, int]:
    """A safetensors file's tensor table, and where its data begins."""
    with open(path, "rb") as f:
        (length,) = struct.unpack("<Q", f.read(8))
        header = json.loads(f.read(length))
    header.pop("__metadata__", None)
    return header, 8 + length


def plan_file(path: Path, params: dict[str, torch.Tensor]) -> list[Segment]:
    header, data_start = read_header(path)
    segments = []
    for name, info in header.items():
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
        segments.append(Segment(data_start + begin, data_start + end, param.view(-1).view(torch.uint8)))
    return sorted(segments, key=lambda s: s.start)


def chunks(segments: list[Segment], chunk_size: int) -> list[tuple[int, int, list[Segment]]]:
    """Contiguous file ranges that end at multiples of `chunk_size` (so on page
    boundaries: no two ranges share a page), each with the segments, or pieces
    of segments, that fall in it."""
    out: list[tuple[int, int, list[Segment]]] = []
    lo = hi = 0
    parts: list[Segment] = []
    for seg in segments:
        start = seg.start
        while start < seg.end:
            if parts and (start != hi or hi % chunk_size == 0):
                out.append((lo, hi, parts))
                parts = []
            if not parts:
                lo = start
            end = min(seg.end, (start // chunk_size + 1) * chunk_size)
            parts.append(Segment(start, end, seg.dest[start - seg.start : end - seg.start]))
            hi = start = end
    if parts:
        out.append((lo, hi, parts))
    return out


class Reader:
    """One thread's two staging buffers, stream and events."""

    def __init__(self, size: int, device: torch.device) -> None:
        self.cuda = device.type == "cuda"
        self.buffers = [torch.empty(size, dtype=torch.uint8, pin_memory=self.cuda) for _ in range(2)]
        self.events = [None, None]
        self.stream = torch.cuda.Stream(device) if self.cuda else None
        self.turn = 0

    def read_and_copy(self, fd: int, lo: int, hi: int, parts: list[Segment]) -> None:
        i, self.turn = self.turn, 1 - self.turn
        if self.events[i] is not None:
            self.events[i].synchronize()  # the copy out of this buffer has finished
        buf = self.buffers[i][: hi - lo]
        view, done = memoryview(buf.numpy()), 0
        while done < hi - lo:
            n = os.preadv(fd, [view[done:]], lo + done)
            if n == 0:
                raise UserError(f"unexpected end of file at byte {lo + done}: the file is truncated")
            done += n
        if self.cuda:
            with torch.cuda.stream(self.stream):
                for p in parts:
                    p.dest.copy_(buf[p.start - lo : p.end - lo], non_blocking=True)
                self.events[i] = torch.cuda.Event()
                self.events[i].record(self.stream)
        else:
            for p in parts:
                p.dest.copy_(buf[p.start - lo : p.end - lo])


def load_files(paths: list[Path], params: dict[str, torch.Tensor], device: torch.device,
               threads: int, chunk_size: int) -> int:
    """Read every file into `params`; returns the bytes read."""
    work = []
    for path in paths:
        segments = plan_file(path, params)
        work += [(path, lo, hi, parts) for lo, hi, parts in chunks(segments, chunk_size)]
    if params:
        raise UserError(f"the checkpoint lacks {len(params)} tensors, e.g. {next(iter(params))}; save it again")
    local = threading.local()
    readers: list[Reader] = []  # held until the final synchronize: copies out of their buffers may be in flight

    def run(item: tuple[Path, int, int, list[Segment]]) -> None:
        if not hasattr(local, "reader"):
            local.reader = Reader(chunk_size, device)
            readers.append(local.reader)
        path, lo, hi, parts = item
        local.reader.read_and_copy(fds[path], lo, hi, parts)

    fds = {path: os.open(path, os.O_RDONLY) for path in paths}
    try:
        with ThreadPoolExecutor(threads) as pool:
            list(pool.map(run, work))
        if device.type == "cuda":
            torch.cuda.synchronize(device)
    finally:
        for fd in fds.values():
            os.close(fd)
    return sum(hi - lo for _, lo, hi, _ in work)
