"""Writing one rank's tensors as safetensors parts, in the worker that holds them."""

import dataclasses
import json
import os
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors import SafetensorError
from safetensors.torch import save_file

from presharded.manifest import Shard, hash_file, render

SAVE_FORMAT = "presharded_save"


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
    try:
        for part, tensors in enumerate(split_parts(state, max_file_size)):
            path = folder / render(pattern, pp_rank=pp_rank, tp_rank=tp_rank, part=part)
            written.append(path)
            save_file({k: t.contiguous() for k, t in tensors.items()}, path, metadata={"format": "pt"})
            fsync(path)  # on disk before the manifest says the checkpoint is complete
            shards.append(Shard(path.name, pp_rank, tp_rank, part, path.stat().st_size, hash_file(path)))
    except (OSError, SafetensorError) as e:
        # Free what this rank took (the disk may be full), then leave the main
        # process a one-line reason: the engine only reports that a worker died.
        for path in written:
            path.unlink(missing_ok=True)
        rank_file(folder, pp_rank, tp_rank, "failed").write_text(f"{describe(e)} while writing {path}")
        raise
    return shards


def fsync(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def describe(e: BaseException) -> str:
    """`No space left on device`, from an OSError or safetensors' own error."""
    if isinstance(e, OSError) and e.strerror:
        return e.strerror
    return str(e).removeprefix("Error while serializing: ").removeprefix("I/O error: ")


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
