"""The checkpoint's manifest: what was saved, for which layout, and every file
with its size and hash. Written last: a folder without one is not finished."""

import dataclasses
import json
import os
from dataclasses import dataclass, field
from pathlib import Path

import blake3

from presharded.errors import UserError

MANIFEST_NAME = "presharded.json"
FORMAT_NAME = "presharded"
FORMAT_VERSION = 3  # 2: each weight file's header hash; 3: the node that wrote each
# vLLM's own names, so its built-in sharded_state loader reads our files too.
TP_PATTERN = "model-rank-{rank}-part-{part}.safetensors"
PP_PATTERN = "model-pp-{pp_rank}-tp-{tp_rank}-part-{part}.safetensors"


def default_pattern(pipeline_parallel_size: int) -> str:
    return PP_PATTERN if pipeline_parallel_size > 1 else TP_PATTERN


def render(pattern: str, *, pp_rank: int, tp_rank: int, part: int | str) -> str:
    """A rank's file name; `part="*"` gives the glob of all its parts."""
    return pattern.format(rank=tp_rank, tp_rank=tp_rank, pp_rank=pp_rank, part=part)


def hash_file(path: Path) -> str:
    return blake3.blake3(max_threads=blake3.blake3.AUTO).update_mmap(path).hexdigest()


def hash_header(path: Path) -> str:
    """The hash of a safetensors file's length field and tensor table."""
    with open(path, "rb") as f:
        head = f.read(8)
        length = int.from_bytes(head, "little") if len(head) == 8 else 0
        return blake3.blake3(head + f.read(min(length, 100 * 2**20))).hexdigest()


@dataclass
class Shard:
    path: str
    pp_rank: int
    tp_rank: int
    part: int
    size: int
    blake3: str
    header_blake3: str | None = None  # its tensor table, checked on every load (version 2 on)
    node: int = 0  # the node that wrote it, when several saved together (--nnodes)


@dataclass
class CopiedFile:
    path: str
    size: int
    blake3: str


@dataclass
class Manifest:
    vllm_version: str
    tensor_parallel_size: int
    pipeline_parallel_size: int
    enable_expert_parallel: bool
    file_pattern: str
    dtype: str
    quantization: str | None
    architecture: str
    source: str
    created: str
    shards: list[Shard]
    files: list[CopiedFile]
    online_quantization: bool = False  # saved unquantized; vLLM quantizes while loading
    aliases: dict[str, str] = field(default_factory=dict)  # a tensor saved once under another name -> that name
    nodes: int = 1  # how many nodes saved it; each may hold only its own ranks' files
    caches: dict[str, list[CopiedFile]] = field(default_factory=dict)  # start-up caches: presharded/start_caches.py
    format: str = FORMAT_NAME
    format_version: int = FORMAT_VERSION
    hash: str = "blake3"
    total_bytes: int = field(init=False)

    def __post_init__(self) -> None:
        self.total_bytes = sum(s.size for s in self.shards)

    def shards_of(self, ranks) -> list[Shard]:
        """The shards of these (pipeline stage, tensor-parallel rank) pairs."""
        return [s for s in self.shards if (s.pp_rank, s.tp_rank) in set(ranks)]

    def engine_defaults(self) -> dict:
        """Engine settings this checkpoint was saved for, to use where the user set none."""
        defaults = {
            "tensor_parallel_size": self.tensor_parallel_size,
            "pipeline_parallel_size": self.pipeline_parallel_size,
            "enable_expert_parallel": self.enable_expert_parallel,
            "dtype": self.dtype,
            "quantization": self.quantization,
        }
        if self.file_pattern != default_pattern(self.pipeline_parallel_size):
            defaults["model_loader_extra_config"] = {"pattern": self.file_pattern}
        return defaults

    def to_json(self) -> str:
        return json.dumps(dataclasses.asdict(self), indent=2) + "\n"

    @classmethod
    def from_json(cls, text: str, where: Path) -> "Manifest":
        try:
            raw = json.loads(text)
        except json.JSONDecodeError as e:
            raise UserError(f"{where} is not valid JSON ({e}); save the checkpoint again")
        if not isinstance(raw, dict) or raw.get("format") != FORMAT_NAME:
            raise UserError(f"{where} is not a presharded manifest; save the checkpoint again")
        version = raw.get("format_version")
        if not isinstance(version, int) or version > FORMAT_VERSION:
            raise UserError(
                f"{where} has format version {version!r}, newer than this presharded reads "
                f"({FORMAT_VERSION}); upgrade presharded"
            )
        try:
            raw.pop("total_bytes", None)
            raw["shards"] = [Shard(**s) for s in raw["shards"]]
            raw["files"] = [CopiedFile(**f) for f in raw["files"]]
            raw["caches"] = {name: [CopiedFile(**f) for f in files] for name, files in raw.get("caches", {}).items()}
            return cls(**raw)
        except KeyError as e:
            raise UserError(f"{where} lacks the field {e}; save the checkpoint again")
        except TypeError as e:
            raise UserError(f"{where} is malformed ({e}); save the checkpoint again")


def read_manifest(folder: Path) -> Manifest | None:
    """The folder's manifest, or None when it has none."""
    path = folder / MANIFEST_NAME
    try:
        text = path.read_text()
    except FileNotFoundError:
        return None
    except (OSError, UnicodeDecodeError) as e:
        raise UserError(f"cannot read {path} ({e}); check its permissions or save again")
    return Manifest.from_json(text, path)


def write_manifest(folder: Path, manifest: Manifest) -> None:
    tmp = folder / (MANIFEST_NAME + ".tmp")
    with open(tmp, "w") as f:
        f.write(manifest.to_json())
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, folder / MANIFEST_NAME)
