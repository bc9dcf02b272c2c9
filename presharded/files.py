"""Files around the weights: where the source is, what to copy from it, and
how a checkpoint appears in its output folder only once it is complete."""

import fnmatch
import os
import shutil
from pathlib import Path

from presharded.errors import UserError

# The source's own weights are never copied: the checkpoint carries its own.
SOURCE_WEIGHTS = (
    "*.safetensors",
    "*.bin",
    "*.pt",
    "*.pth",
    "*.safetensors.index.json",
    "*.bin.index.json",
    "original/*",
)
# Present in a staging folder until the save has finished; no load accepts it.
UNFINISHED_MARKER = ".presharded-unfinished"


def is_source_weight(relative: str) -> bool:
    return any(fnmatch.fnmatch(relative, pattern) for pattern in SOURCE_WEIGHTS)


def resolve_model(model: str, revision: str | None = None) -> Path:
    """A local folder as it is, or a hub id downloaded without its weights
    (vLLM fetches those itself into the same cache while it loads)."""
    path = Path(model).expanduser()
    if path.is_dir():
        return path.resolve()
    if path.exists() or model.startswith((".", "/", "~")) or model.count("/") != 1:
        raise UserError(f"model {model} is not a folder or a hub id; pass a model folder")
    from huggingface_hub import snapshot_download
    from huggingface_hub.errors import HfHubHTTPError, LocalEntryNotFoundError

    try:
        return Path(snapshot_download(model, revision=revision, ignore_patterns=list(SOURCE_WEIGHTS)))
    except (HfHubHTTPError, LocalEntryNotFoundError, OSError) as e:
        reason = str(e).splitlines()[0] if str(e) else type(e).__name__
        raise UserError(f"cannot fetch {model} from the hub ({reason}); pass a local model folder")


def has_weights(folder: Path) -> bool:
    return any(
        fnmatch.fnmatch(p.name, pattern)
        for p in folder.rglob("*")
        for pattern in ("*.safetensors", "*.bin", "*.pt", "*.pth", "*.gguf")
    )


def copy_model_files(source: Path, dest: Path) -> list[str]:
    """Copy config, tokenizer, chat template and custom code; never weights."""
    copied = []
    for path in sorted(source.rglob("*")):
        relative = path.relative_to(source).as_posix()
        if path.is_dir() or relative.startswith(".") or is_source_weight(relative):
            continue
        (dest / relative).parent.mkdir(parents=True, exist_ok=True)
        shutil.copy2(path, dest / relative)
        copied.append(relative)
    return copied


def staging_folder(output: Path) -> Path:
    """Where a save to `output` is written before it is moved into place: beside
    it, so the final move is a rename on one filesystem."""
    return output.parent / f".{output.name}.presharded-staging"


def check_output(source: Path, output: Path, *, replace: bool) -> None:
    output = output.resolve()
    if output == source or source in output.parents:
        raise UserError(f"output {output} is inside the source model {source}; choose a folder outside it")
    if output.exists() and not output.is_dir():
        raise UserError(f"output {output} exists and is not a folder; choose another --output")
    if output.is_dir() and any(output.iterdir()) and not replace:
        raise UserError(f"output {output} exists and is not empty; choose another --output or pass --replace")
    parent = output.parent
    while not parent.exists():
        parent = parent.parent
    if not os.access(parent, os.W_OK | os.X_OK):
        raise UserError(f"cannot write to {parent}; choose an --output you can write to")


def start_staging(output: Path) -> Path:
    """An empty staging folder, marked unfinished; what an earlier interrupted
    save left there is removed first."""
    staging = staging_folder(output.resolve())
    shutil.rmtree(staging, ignore_errors=True)
    try:
        staging.mkdir(parents=True)
        (staging / UNFINISHED_MARKER).touch()
    except OSError as e:
        raise UserError(f"cannot write {e.filename} ({e.strerror}); choose an --output you can write to")
    return staging


def publish(staging: Path, output: Path) -> None:
    """Move a finished staging folder to `output`, replacing what was there
    only now that the new checkpoint is complete."""
    (staging / UNFINISHED_MARKER).unlink()
    output = output.resolve()
    old = output.parent / f".{output.name}.presharded-old"
    shutil.rmtree(old, ignore_errors=True)
    if output.exists():
        os.replace(output, old)
    os.replace(staging, output)
    shutil.rmtree(old, ignore_errors=True)
