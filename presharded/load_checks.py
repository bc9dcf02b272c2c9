"""Checks of a checkpoint against its manifest, made before any engine starts."""

import glob
import re
import sys
from pathlib import Path

from presharded.errors import UserError
from presharded.formats import SHARDED_STATE
from presharded.staging import UNFINISHED_MARKER
from presharded.manifest import MANIFEST_NAME, CopiedFile, Manifest, Shard, hash_file, hash_header, read_manifest
from presharded.nodes import Node
from presharded.progress import bar

# vLLM's own file names: what a checkpoint without a manifest says of its layout.
NAMES_LAYOUT = (
    (re.compile(r"model-rank-(?P<tp>\d+)-part-\d+\.safetensors"), False),
    (re.compile(r"model-pp-(?P<pp>\d+)-tp-(?P<tp>\d+)-part-\d+\.safetensors"), True),
)


def check_layout(folder: Path, saved: dict, tensor_parallel_size: int | None,
                 pipeline_parallel_size: int | None) -> None:
    """The sizes asked (None: not asked) are the ones `saved` (engine settings)."""
    for name, flag, asked in [("tensor-parallel size", "--tensor-parallel-size", tensor_parallel_size),
                              ("pipeline-parallel size", "--pipeline-parallel-size", pipeline_parallel_size)]:
        dest = flag.removeprefix("--").replace("-", "_")
        if asked is not None and asked != saved[dest]:
            raise UserError(
                f"{folder} was saved for {name} {saved[dest]} but {asked} was asked; "
                f"load it with {flag} {saved[dest]}, or save it again for {asked}"
            )


def layout_from_names(folder: Path) -> dict:
    """Tensor- and pipeline-parallel sizes that vLLM's file names in `folder`
    tell (its highest ranks), as engine settings; {} where they tell none."""
    tp = pp = files = 0
    for path in folder.glob("*.safetensors"):
        for regex, staged in NAMES_LAYOUT:
            if m := regex.fullmatch(path.name):
                tp = max(tp, int(m["tp"]) + 1)
                pp = max(pp, int(m["pp"]) + 1 if staged else 1)
                files += 1
    if tp * pp > files:  # each rank has a file at least
        raise UserError(f"{folder}'s file names number {tp * pp} ranks, but it holds {files} weight files: "
                        "ranks are missing; copy the whole checkpoint folder")
    return {"tensor_parallel_size": tp, "pipeline_parallel_size": pp} if tp else {}


def saved_layout(folder: Path, manifest: Manifest | None) -> dict:
    """The engine settings a checkpoint was saved for, to use where the user set none."""
    return manifest.engine_defaults() if manifest else layout_from_names(folder)


def check_for_load(folder: Path, *, tensor_parallel_size: int | None = None, pipeline_parallel_size: int | None = None,
                   load_format: str | None = None, node: Node = Node(), rank: tuple[int, int] | None = None,
                   verify_hashes: bool = False, s3_url: str | None = None, required: bool = False) -> Manifest | None:
    """What a load checks before any engine starts: the checkpoint's manifest once every check passes;
    None (with a warning) for a checkpoint made without one, such as vLLM's own example writes. The
    weights of the ranks `node` runs (of one `rank`) are required, their tensor tables hashed, the
    copied files (config, tokenizer) hashed; the weights too with `verify_hashes`. With `s3_url` the
    folder is an S3 checkpoint's local copy (presharded/s3.py): its weights are checked there.
    `required`: a checkpoint without a manifest is refused."""
    check_folder(folder, load_format)
    manifest = read_manifest(folder)
    if manifest is None and required:
        raise UserError(f"{folder} has no {MANIFEST_NAME}: there is nothing to verify it against")
    if manifest is None:
        if names := layout_from_names(folder):
            check_layout(folder, names, tensor_parallel_size, pipeline_parallel_size)
        print(f"warning: {folder} has no {MANIFEST_NAME}: its files and hashes cannot be checked", file=sys.stderr)
        return None
    check_format(folder, manifest, load_format)
    check_layout(folder, manifest.engine_defaults(), tensor_parallel_size, pipeline_parallel_size)
    shards = manifest.shards_of([rank] if rank else node.ranks(manifest.tensor_parallel_size,
                                                               manifest.pipeline_parallel_size))
    if s3_url:  # the weights stay in S3: checked there
        from presharded import s3

        s3.check_weights(s3_url, manifest, shards, verify_hashes)
        shards = []
    check_sizes(folder, manifest, [*shards, *manifest.files], node)
    check_listed(folder, manifest, folder.glob("*.safetensors"))
    check_tables(folder, shards)
    check_hashes(folder, [*manifest.files, *(shards if verify_hashes else [])])
    return manifest


def checked_manifest(folder: Path, s3_url: str | None = None) -> Manifest:
    """A load's checks, of a checkpoint that must have a manifest (what adds to it, or serves it)."""
    return check_for_load(folder, s3_url=s3_url, required=True)


def verify_checkpoint(folder: Path, node: Node = Node(), s3_url: str | None = None) -> Manifest:
    """presharded-verify's: a load's checks with every hash, the start-up caches and engine snapshots
    hashed too, and no file in the folder that the manifest does not list."""
    manifest = check_for_load(folder, node=node, verify_hashes=True, s3_url=s3_url, required=True)
    cached = cached_entries(manifest)
    check_sizes(folder, manifest, cached, node)
    check_listed(folder, manifest, folder.rglob("*"))
    check_hashes(folder, cached)
    return manifest


def cached_entries(manifest: Manifest) -> list[CopiedFile]:
    """Every file of the checkpoint's start-up caches and engine snapshots."""
    return [e for sets in (manifest.caches, manifest.snapshots) for entries in sets.values() for e in entries]


def check_folder(folder: Path, load_format: str | None = None) -> None:
    """A folder that a save finished, at a path that `load_format` can read."""
    if not folder.is_dir():
        raise UserError(f"checkpoint {folder} is not a folder; pass the --output of save_sharded_state.py")
    if (folder / UNFINISHED_MARKER).exists():
        raise UserError(f"{folder} is an unfinished save; run save_sharded_state.py again")
    if load_format == SHARDED_STATE and glob.has_magic(str(folder.resolve())):
        raise UserError(f"vLLM's sharded_state loader cannot read {folder}: its path has a glob character "
                        "(* ? [ ]); rename it, or load with --load-format fast_sharded_state")


def check_format(folder: Path, manifest: Manifest, load_format: str | None) -> None:
    if manifest.online_quantization and load_format == SHARDED_STATE:
        raise UserError(
            f"{folder} holds unquantized weights that vLLM quantizes ({manifest.quantization}) while loading, "
            "which its sharded_state loader cannot do (it would leave them empty); "
            "load it with --load-format fast_sharded_state"
        )


def check_sizes(folder: Path, manifest: Manifest, entries: list, node: Node) -> None:
    """Every one of `entries` there, of the size the manifest says."""
    for entry in entries:
        path = folder / entry.path
        if not path.is_file():
            raise UserError(missing(folder, manifest, entry, node))
        if path.stat().st_size != entry.size:
            raise UserError(
                f"{path} has {path.stat().st_size} bytes, the manifest says {entry.size}; "
                "the copy is incomplete or damaged: copy it again, or save again"
            )


def check_listed(folder: Path, manifest: Manifest, candidates) -> None:
    """No file among `candidates` that the manifest does not list: a stray weight file would be loaded."""
    listed = {e.path for e in manifest.entries()} | {MANIFEST_NAME}
    for path in sorted(p for p in candidates if p.is_file()):
        if path.relative_to(folder).as_posix() not in listed:
            raise UserError(
                f"{path} is not part of this checkpoint (not in its manifest); remove it, "
                "or save the checkpoint into an empty folder"
            )


def check_tables(folder: Path, shards: list[Shard]) -> None:
    """Each weight file's tensor table (names, shapes, dtypes) the one saved: cheap, on every load."""
    for shard in shards:
        if shard.header_blake3 and hash_header(folder / shard.path) != shard.header_blake3:
            raise UserError(
                f"{folder / shard.path}: its tensor table (names, shapes, dtypes) is not the one saved; "
                "copy it again, or save again"
            )


def check_hashes(folder: Path, entries: list) -> None:
    total = sum(e.size for e in entries)
    with bar(total if total > 2**26 else 0, "hashing") as progress:  # a bar only where it takes a while
        for entry in entries:
            if hash_file(folder / entry.path) != entry.blake3:
                raise UserError(
                    f"{folder / entry.path} does not match its hash in the manifest: "
                    "it was changed or damaged; copy it again, or save again"
                )
            progress.update(entry.size)


def missing(folder: Path, manifest: Manifest, entry: Shard | CopiedFile, node: Node) -> str:
    where = f"{folder / entry.path} is missing"
    if manifest.nodes == 1 or not isinstance(entry, Shard):
        return f"{where}; copy the whole checkpoint folder, or save it again"
    ranks = f"pp={entry.pp_rank} tp={entry.tp_rank}"
    if node.count == 1:
        return (f"{where}: {manifest.nodes} nodes saved this checkpoint, each keeping its own ranks' files, and rank "
                f"{ranks} is node {entry.node}'s; copy every node's files into this folder, or load across the nodes "
                "(--nnodes, --node-rank)")
    return (f"{where} on {node}, which runs rank {ranks}: the node that saved it was node {entry.node}; "
            "copy its files here, or start each node with the --node-rank it saved with")
