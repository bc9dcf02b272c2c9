"""The safetensors layout, byte by byte: the header, where each tensor's bytes
lie in the file, and the chunks in which the reader and the writer move them.
Written by hand (a small format) so bytes can stream between the GPU and the
file through a few staging buffers."""

import json
import os
import struct
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch

from presharded.errors import UserError

DTYPES = {"BF16": torch.bfloat16, "F16": torch.float16, "F32": torch.float32, "F64": torch.float64,
          "I8": torch.int8, "U8": torch.uint8, "I16": torch.int16, "I32": torch.int32, "I64": torch.int64,
          "BOOL": torch.bool, "F8_E4M3": torch.float8_e4m3fn, "F8_E5M2": torch.float8_e5m2}
NAMES = {dtype: name for name, dtype in DTYPES.items()}


@dataclass
class Segment:
    """Bytes [start, end) of a file, and the tensor (a flat uint8 view) they belong to."""

    start: int
    end: int
    tensor: torch.Tensor


def flat_bytes(tensor: torch.Tensor) -> torch.Tensor:
    return tensor.reshape(-1).view(torch.uint8)


MAX_HEADER = 100 * 2**20  # safetensors' own limit on a tensor table


def read_header(path: Path) -> tuple[dict, int]:
    """A safetensors file's tensor table, and where its data begins; every
    tensor's bytes lie inside the file."""
    with open(path, "rb") as f:
        return parse_header(str(path), os.fstat(f.fileno()).st_size, lambda at, n: os.pread(f.fileno(), n, at))


def parse_header(name: str, size: int, read: Callable[[int, int], bytes]) -> tuple[dict, int]:
    """The same, from `read(offset, length)` of a file of `size` bytes (one on disk or in S3)."""
    head = read(0, 8)
    length = int.from_bytes(head, "little") if len(head) == 8 else -1
    header = None
    if 0 < length <= min(size - 8, MAX_HEADER):
        try:
            header = json.loads(read(8, length))
        except (ValueError, RecursionError):
            pass
    if not isinstance(header, dict):
        raise UserError(f"{name} is not a safetensors file (no readable tensor table); copy it again, or save again")
    header.pop("__metadata__", None)
    for tensor, info in header.items():
        offsets = info.get("data_offsets") if isinstance(info, dict) else None
        if not (isinstance(offsets, list) and len(offsets) == 2 and all(type(o) is int for o in offsets)
                and 0 <= offsets[0] <= offsets[1] <= size - 8 - length):
            raise UserError(f"{name}: {tensor}'s bytes do not lie inside the file; copy it again, or save again")
    return header, 8 + length


def encode_header(tensors: dict[str, torch.Tensor]) -> tuple[bytes, list[Segment]]:
    """The header of a file holding `tensors` (contiguous), in order, and their segments."""
    table, offset = {}, 0
    for name, t in tensors.items():
        if t.dtype not in NAMES:
            raise UserError(f"{name} is {t.dtype}, which safetensors files cannot hold")
        table[name] = {"dtype": NAMES[t.dtype], "shape": list(t.shape), "data_offsets": [offset, offset + t.nbytes]}
        offset += t.nbytes
    text = json.dumps({"__metadata__": {"format": "pt"}, **table}, separators=(",", ":")).encode()
    text += b" " * (-len(text) % 8)  # the data starts 8-byte aligned
    start = 8 + len(text)
    segments = [Segment(start + v["data_offsets"][0], start + v["data_offsets"][1], flat_bytes(tensors[name]))
                for name, v in table.items()]
    return struct.pack("<Q", len(text)) + text, segments


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
            parts.append(Segment(start, end, seg.tensor[start - seg.start : end - seg.start]))
            hi = start = end
    if parts:
        out.append((lo, hi, parts))
    return out

