"""What the save script and the engine's workers tell each other. The script
asks through the engine's model_loader_extra_config; each worker answers with
a record file in the staging folder, since the engine reports no more than
that a worker died. No torch here: the script reads these before vLLM starts."""

import dataclasses
import json
from dataclasses import dataclass
from pathlib import Path

from presharded.manifest import Shard
from presharded.formats import SAVE_FORMAT


@dataclass
class SaveRequest:
    """What the script asks of every worker."""

    folder: str
    file_pattern: str
    max_file_size: int | None = None
    source_load_format: str = "auto"

    def as_extra_config(self, extra: dict | None) -> dict:
        return {**(extra or {}), SAVE_FORMAT: dataclasses.asdict(self)}

    @classmethod
    def from_extra_config(cls, extra: dict) -> tuple["SaveRequest", dict]:
        """The request, and the rest of the loader's config."""
        rest = dict(extra)
        return cls(**rest.pop(SAVE_FORMAT)), rest


@dataclass
class RankRecord:
    """What one worker wrote, and the model facts the manifest needs."""

    shards: list[Shard]
    dtype: str
    quantization: str | None
    architecture: str
    online_quantization: bool
    aliases: dict[str, str]  # tensors saved once under another name: presharded/save_loader.py
    write_seconds: float


def _rank_file(folder: Path, pp_rank: int, tp_rank: int, suffix: str) -> Path:
    return folder / f".rank-pp{pp_rank}-tp{tp_rank}.{suffix}"


def write_record(folder: Path, pp_rank: int, tp_rank: int, record: RankRecord) -> None:
    _rank_file(folder, pp_rank, tp_rank, "json").write_text(json.dumps(dataclasses.asdict(record)))


def write_failure(folder: Path, pp_rank: int, tp_rank: int, reason: str) -> None:
    """A worker's one-line reason why it could not write its files."""
    _rank_file(folder, pp_rank, tp_rank, "failed").write_text(reason)


def read_records(folder: Path, tp_size: int, pp_size: int) -> list[RankRecord]:
    """Every rank's record, removed from the folder; a missing one means that
    rank never wrote its state."""
    records = []
    for pp_rank in range(pp_size):
        for tp_rank in range(tp_size):
            path = _rank_file(folder, pp_rank, tp_rank, "json")
            if not path.exists():
                raise RuntimeError(f"rank pp={pp_rank} tp={tp_rank} wrote no weights to {folder}")
            raw = json.loads(path.read_text())
            raw["shards"] = [Shard(**s) for s in raw["shards"]]
            records.append(RankRecord(**raw))
            path.unlink()
    return records


def why_save_failed(folder: Path, error: BaseException) -> str | None:
    """Why a save failed, in one line, when the cause was writing files: here,
    or in a worker (its note in the staging folder)."""
    if isinstance(error, OSError):
        return f"{describe(error)} while writing {error.filename or folder}"
    for path in sorted(folder.glob(".rank-*.failed")):
        return path.read_text()
    return None


def describe(e: OSError) -> str:
    """`No space left on device`, without errno's number."""
    return e.strerror or str(e)
