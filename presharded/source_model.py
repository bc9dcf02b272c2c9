"""The model a save reads: where it is, and what to copy from it beside the weights."""

import errno
import fnmatch
import shutil
from pathlib import Path

from presharded.errors import UserError
from presharded.manifest import MANIFEST_NAME

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
# vLLM's sharded_state file names, with and without pipeline stages.
SHARDED_WEIGHTS = ("model-rank-*-part-*.safetensors", "model-pp-*-tp-*-part-*.safetensors")


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


def is_checkpoint(folder: Path) -> bool:
    """A pre-sharded checkpoint: ours (a manifest) or vLLM's own (its file names)."""
    return (folder / MANIFEST_NAME).exists() or any(
        next(folder.glob(pattern), None) for pattern in SHARDED_WEIGHTS
    )


def copy_model_files(source: Path, dest: Path) -> list[str]:
    """Copy config, tokenizer, chat template and custom code; never weights."""
    copied = []
    for path in sorted(source.rglob("*")):
        relative = path.relative_to(source).as_posix()
        if path.is_dir() or relative.startswith(".") or relative == MANIFEST_NAME or is_source_weight(relative):
            continue
        (dest / relative).parent.mkdir(parents=True, exist_ok=True)
        try:
            shutil.copy2(path, dest / relative)
        except OSError as e:
            if e.errno in (errno.ENOSPC, errno.EDQUOT, errno.EFBIG):  # the copy, not the source, is at fault
                e.filename, e.filename2 = str(dest / relative), None
            raise
        copied.append(relative)
    return copied
