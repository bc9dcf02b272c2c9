"""What the save script and the engine's workers tell each other. The script
asks through the engine's model_loader_extra_config; each worker keeps a
record of what it wrote, which the script asks for through the engine (the
workers may be on other machines); a worker that fails leaves its reason in
its node's staging folder, since the engine reports no more than that a
worker died. No torch here."""

import dataclasses
from dataclasses import dataclass
from pathlib import Path

from presharded.manifest import Shard
from presharded.formats import SAVE_FORMAT

SAVE_RECORDS = "presharded.save_loader.SaveRecords"  # the workers' side: --worker-extension-cls


@dataclass
class SaveRequest:
    """What the script asks of every worker."""

    folder: str
    file_pattern: str
    max_file_size: int | None = None
    source_load_format: str = "auto"
    node: int = 0  # the --node-rank of the script that asks (several machines: presharded/nodes.py)

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
    node: int = 0  # the node (--node-rank) whose worker wrote the files
    host: str = ""
    folder: str = ""  # where, on that node

    @classmethod
    def from_dict(cls, raw: dict) -> "RankRecord":
        return cls(**{**raw, "shards": [Shard(**s) for s in raw["shards"]]})


def _rank_file(folder: Path, pp_rank: int, tp_rank: int, suffix: str) -> Path:
    return folder / f".rank-pp{pp_rank}-tp{tp_rank}.{suffix}"


def write_failure(folder: Path, pp_rank: int, tp_rank: int, reason: str) -> None:
    """A worker's one-line reason why it could not write its files."""
    _rank_file(folder, pp_rank, tp_rank, "failed").write_text(reason)


def check_records(records: list[RankRecord], tp_size: int, pp_size: int) -> list[RankRecord]:
    """Every rank's record, in order; a missing one means that rank never wrote its state."""
    by_rank = {(s.pp_rank, s.tp_rank): r for r in records for s in r.shards}
    for pp_rank in range(pp_size):
        for tp_rank in range(tp_size):
            if (pp_rank, tp_rank) not in by_rank:
                raise RuntimeError(f"rank pp={pp_rank} tp={tp_rank} wrote no weights")
    return [by_rank[pp, tp] for pp in range(pp_size) for tp in range(tp_size)]


def why_save_failed(folder: Path, error: BaseException) -> str | None:
    """Why a save failed, in one line, when the cause was writing files: here,
    or in a worker (its note in the staging folder)."""
    if isinstance(error, OSError):  # a copy's error names its source first, what it was writing second
        return f"{describe(error)} while writing {error.filename2 or error.filename or folder}"
    for path in sorted(folder.glob(".rank-*.failed")):
        return path.read_text()
    return None


def describe(e: OSError) -> str:
    """`No space left on device`, without errno's number."""
    return e.strerror or str(e)
