"""Writing one rank's tensors as safetensors parts, in the worker that holds them."""

import contextlib
import dataclasses
import json
import os
from dataclasses import dataclass
from pathlib import Path

import blake3
import torch

from presharded.manifest import Shard, render
from presharded.safetensors_layout import chunks, encode_header

SAVE_FORMAT = "presharded_save"
CHUNK_SIZE = 64 * 2**20  # bytes per staging buffer; two per rank


@dataclass
class SaveRequest:
    """What the main process asks of every worker; it travels in the engine's
    model_loader_extra_config[SAVE_FORMAT]."""

    folder: str
    file_pattern: str
    max_file_size: int | None = None
    source_load_format: str = "auto"


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
    try:
        for part, tensors in enumerate(split_parts(state, max_file_size)):
            path = folder / render(pattern, pp_rank=pp_rank, tp_rank=tp_rank, part=part)
            written.append(path)
            digest = write_file(path, {k: t.contiguous() for k, t in tensors.items()}, buffers)
            shards.append(Shard(path.name, pp_rank, tp_rank, part, path.stat().st_size, digest))
    except OSError as e:
        e.filename = e.filename or str(written[-1])  # a failed write() names no file
        # Free what this rank took (the disk may be full), then leave the main
        # process a one-line reason: the engine only reports that a worker died.
        for done in written:
            done.unlink(missing_ok=True)
        rank_file(folder, pp_rank, tp_rank, "failed").write_text(f"{describe(e)} while writing {e.filename}")
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


def describe(e: OSError) -> str:
    """`No space left on device`, without errno's number."""
    return e.strerror or str(e)


def write_failure(folder: Path, error: BaseException) -> str | None:
    """Why a save failed, in one line, when the cause was writing files."""
    if isinstance(error, OSError):
        return f"{describe(error)} while writing {error.filename or folder}"
    for path in sorted(folder.glob(".rank-*.failed")):
        return path.read_text()
    return None


def rank_file(folder: Path, pp_rank: int, tp_rank: int, suffix: str) -> Path:
    """A rank's note to the main process in the staging folder: `json` for what
    it wrote, `failed` for why it could not."""
    return folder / f".rank-pp{pp_rank}-tp{tp_rank}.{suffix}"


def write_rank_record(folder: Path, shards: list[Shard], **model_facts: object) -> None:
    """What one rank wrote, for the main process to gather into the manifest."""
    pp_rank, tp_rank = shards[0].pp_rank, shards[0].tp_rank
    record = {"shards": [dataclasses.asdict(s) for s in shards], **model_facts}
    rank_file(folder, pp_rank, tp_rank, "json").write_text(json.dumps(record))


def read_rank_records(folder: Path, tp_size: int, pp_size: int) -> list[dict]:
    """Every rank's record; a missing one means that rank never wrote its state."""
    records = []
    for pp_rank in range(pp_size):
        for tp_rank in range(tp_size):
            path = rank_file(folder, pp_rank, tp_rank, "json")
            if not path.exists():
                raise RuntimeError(f"rank pp={pp_rank} tp={tp_rank} wrote no weights to {folder}")
            records.append(json.loads(path.read_text()))
            path.unlink()
    return records
