"""Checks of a checkpoint against its manifest, made before any engine starts."""

import sys
from pathlib import Path

from presharded.errors import UserError
from presharded.files import UNFINISHED_MARKER
from presharded.manifest import MANIFEST_NAME, Manifest, hash_file, read_manifest


def _layout(name: str, flag: str, saved: int, asked: int | None, folder: Path) -> None:
    if asked is not None and asked != saved:
        raise UserError(
            f"{folder} was saved for {name} {saved} but {asked} was asked; "
            f"load it with {flag} {saved}, or save it again for {asked}"
        )


def check_checkpoint(
    folder: Path,
    *,
    tensor_parallel_size: int | None = None,
    pipeline_parallel_size: int | None = None,
    verify_hashes: bool = False,
    every_file: bool = False,
    require_manifest: bool = False,
    load_format: str | None = None,
) -> Manifest | None:
    """The checkpoint's manifest once every check passes; None (with a warning)
    for a checkpoint made without one, such as vLLM's own example writes.
    Stray files are looked for among the weights, or with `every_file` among
    all files."""
    if not folder.is_dir():
        raise UserError(f"checkpoint {folder} is not a folder; pass the --output of save_sharded_state.py")
    if (folder / UNFINISHED_MARKER).exists():
        raise UserError(f"{folder} is an unfinished save; run save_sharded_state.py again")
    manifest = read_manifest(folder)
    if manifest is None and require_manifest:
        raise UserError(f"{folder} has no {MANIFEST_NAME}: there is nothing to verify it against")
    if manifest is None:
        print(
            f"warning: {folder} has no {MANIFEST_NAME}: its tensor/pipeline-parallel sizes, "
            "files and hashes cannot be checked",
            file=sys.stderr,
        )
        return None
    if manifest.online_quantization and load_format == "sharded_state":
        raise UserError(
            f"{folder} holds unquantized weights that vLLM quantizes ({manifest.quantization}) while loading, "
            "which its sharded_state loader cannot do (it would leave them empty); "
            "load it with --load-format fast_sharded_state"
        )
    _layout("tensor-parallel size", "--tensor-parallel-size", manifest.tensor_parallel_size,
            tensor_parallel_size, folder)
    _layout("pipeline-parallel size", "--pipeline-parallel-size", manifest.pipeline_parallel_size,
            pipeline_parallel_size, folder)
    for entry in [*manifest.shards, *manifest.files]:
        path = folder / entry.path
        if not path.is_file():
            raise UserError(f"{path} is missing; copy the whole checkpoint folder, or save it again")
        if path.stat().st_size != entry.size:
            raise UserError(
                f"{path} has {path.stat().st_size} bytes, the manifest says {entry.size}; "
                "the copy is incomplete or damaged: copy it again, or save again"
            )
    listed = {e.path for e in [*manifest.shards, *manifest.files]} | {MANIFEST_NAME}
    candidates = folder.rglob("*") if every_file else folder.glob("*.safetensors")
    for path in sorted(p for p in candidates if p.is_file()):
        if path.relative_to(folder).as_posix() not in listed:
            raise UserError(
                f"{path} is not part of this checkpoint (not in its manifest); remove it, "
                "or save the checkpoint into an empty folder"
            )
    if verify_hashes:
        for entry in [*manifest.shards, *manifest.files]:
            if hash_file(folder / entry.path) != entry.blake3:
                raise UserError(
                    f"{folder / entry.path} does not match its hash in the manifest: "
                    "it is damaged; copy it again, or save again"
                )
    return manifest
