"""Writing one rank's tensors as safetensors parts, in the worker that holds them:
streamed from the GPU through two pinned buffers, hashed as they are written."""

import contextlib
import os
from pathlib import Path

import blake3
import torch

from presharded.save_messages import describe, write_failure
from presharded.manifest import Shard, hash_header, render
from presharded.progress import bar
from presharded.safetensors_layout import chunks, encode_header

CHUNK_SIZE = 64 * 2**20  # bytes per staging buffer; two per rank


def split_parts(
    state: dict[str, torch.Tensor], max_file_size: int | None
) -> list[dict[str, torch.Tensor]]:
    """Consecutive groups of tensors of at most `max_file_size` bytes each (a
    single larger tensor gets a part of its own)."""
    parts: list[dict[str, torch.Tensor]] = [{}]
    size = 0
    for name, tensor in state.items():
        nbytes = tensor.numel() * tensor.element_size()
        if max_file_size is not None and parts[-1] and size + nbytes > max_file_size:
            parts.append({})
            size = 0
        parts[-1][name] = tensor
        size += nbytes
    return parts


def write_rank(
    state: dict[str, torch.Tensor],
    folder: Path,
    *,
    pattern: str,
    pp_rank: int,
    tp_rank: int,
    max_file_size: int | None,
) -> list[Shard]:
    shards = []
    written: list[Path] = []
    on_gpu = any(t.is_cuda for t in state.values())
    buffers = [torch.empty(CHUNK_SIZE, dtype=torch.uint8, pin_memory=on_gpu) for _ in range(2)]
    total = sum(t.numel() * t.element_size() for t in state.values())
    try:
        with bar(total, f"writing rank pp={pp_rank} tp={tp_rank}", position=tp_rank) as progress:
            for part, tensors in enumerate(split_parts(state, max_file_size)):
                path = folder / render(pattern, pp_rank=pp_rank, tp_rank=tp_rank, part=part)
                written.append(path)
                digest = write_file(path, {k: t.contiguous() for k, t in tensors.items()}, buffers)
                shards.append(Shard(path.name, pp_rank, tp_rank, part, path.stat().st_size, digest,
                                    hash_header(path)))
                progress.update(sum(t.numel() * t.element_size() for t in tensors.values()))
    except OSError as e:
        e.filename = e.filename or str(written[-1])  # a failed write() names no file
        # Free what this rank took (the disk may be full), then leave the main
        # process a one-line reason: the engine only reports that a worker died.
        for done in written:
            done.unlink(missing_ok=True)
        write_failure(folder, pp_rank, tp_rank, f"{describe(e)} while writing {e.filename}")
        raise
    return shards


def write_file(path: Path, tensors: dict[str, torch.Tensor], buffers: list[torch.Tensor]) -> str:
    """Write `tensors` as one safetensors file and return its blake3. Bytes go
    from the GPU into one staging buffer while the other is written and
    hashed, so the file is never read back; it is on disk (fsync) when this
    returns, before any manifest can say the checkpoint is complete."""
    header, segments = encode_header(tensors)
    hasher = blake3.blake3(max_threads=blake3.blake3.AUTO)
    stream = torch.cuda.Stream() if buffers[0].is_pinned() else None
    with open(path, "wb") as f:

        def write(data: memoryview) -> None:
            f.write(data)
            hasher.update(data)

        write(memoryview(header))
        pending = None
        for i, (lo, hi, parts) in enumerate(chunks(segments, len(buffers[0]))):
            buf = buffers[i % 2][: hi - lo]
            with torch.cuda.stream(stream) if stream else contextlib.nullcontext():
                for p in parts:
                    buf[p.start - lo : p.end - lo].copy_(p.tensor, non_blocking=True)
            if pending is not None:
                write(pending)  # the previous chunk, while this one copies
            if stream:
                stream.synchronize()
            pending = memoryview(buf.numpy())
        if pending is not None:
            write(pending)
        f.flush()
        os.fsync(f.fileno())
    return hasher.hexdigest()
