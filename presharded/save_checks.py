"""Every check of a save's request, made before torch or vLLM is imported:
the source is a model, the output is free to take, the file pattern names
plain files that ranks cannot share."""

import argparse
import json
import os
import shutil
from dataclasses import dataclass
from pathlib import Path

from presharded import s3
from presharded.errors import UserError
from presharded.source_model import has_weights, is_checkpoint, resolve_model
from presharded.manifest import default_pattern, pattern_problem, read_manifest

SOURCE_FORMATS = ("auto", "safetensors", "hf", "pt", "npcache", "fastsafetensors", "mistral")


@dataclass
class SaveTarget:
    source: Path
    output: Path
    tensor_parallel_size: int
    pipeline_parallel_size: int
    file_pattern: str
    upload: str | None = None  # --output s3://...: `output` is the local copy, uploaded once complete


def check_save(early: argparse.Namespace) -> SaveTarget:
    if early.model is None:
        raise UserError("--model is required: a model folder or hub id")
    source = resolve_model(early.model, early.revision)
    check_source(source, local=Path(early.model).expanduser().is_dir())
    upload = early.output if s3.is_s3(early.output) else None
    if upload:
        output = check_upload(upload, early)
    else:
        output = Path(early.output).resolve()
    check_output(source, output, replace=early.replace)
    if (early.load_format or "auto") not in SOURCE_FORMATS:
        raise UserError(f"--load-format {early.load_format} cannot be a source; use one of {', '.join(SOURCE_FORMATS)}")
    if (early.data_parallel_size or 1) > 1:
        raise UserError("save with --data-parallel-size 1: every data-parallel replica loads the same files")
    tp, pp = early.tensor_parallel_size or 1, early.pipeline_parallel_size or 1
    pattern = early.file_pattern or default_pattern(pp)
    check_pattern(pattern, tp, pp)
    if early.vllm_save_hook:
        check_save_hook(early, source, pattern, pp)
    return SaveTarget(source, output, tp, pp, pattern, upload)


MOE_KEYS = ("num_experts", "num_local_experts", "n_routed_experts", "moe_num_experts")
HOOK_DROP = "; drop --vllm-save-hook to save each rank as it loads"


def check_save_hook(early: argparse.Namespace, source: Path, pattern: str, pp: int) -> None:
    """What vLLM's save hook (the engine's save_sharded_state, after loading) is known to write in a form
    that does not load back, refused before vLLM starts."""
    try:
        config = json.loads((source / "config.json").read_text())
    except (OSError, ValueError):
        config = {}
    sections = [config, *(v for v in config.values() if isinstance(v, dict))]  # a VLM's text_config too
    if early.quantization or any("quantization_config" in c for c in sections):
        how = f"--quantization {early.quantization}" if early.quantization else f"the quantized model {source}"
        raise UserError(f"{how} with --vllm-save-hook: vLLM's hook saves the weights as its kernels hold them "
                        "after loading, which do not load back quantized (vLLM issue 41174)" + HOOK_DROP)
    if any(isinstance(c.get(k), int) and c[k] > 0 for c in sections for k in MOE_KEYS):
        raise UserError(f"{source} is a mixture-of-experts model: vLLM's hook saves its experts in the layout "
                        "its kernels use after loading (vLLM PR 51496)" + HOOK_DROP)
    if pp > 1:
        raise UserError("--pipeline-parallel-size with --vllm-save-hook: vLLM's hook names files by "
                        "tensor-parallel rank alone, so the stages would overwrite each other" + HOOK_DROP)
    if (early.nnodes or 1) > 1:
        raise UserError("--nnodes with --vllm-save-hook: vLLM's hook leaves each node's files where that node "
                        "wrote them, with no record of them" + HOOK_DROP)
    if "{tp_rank}" in pattern or "{pp_rank}" in pattern:
        raise UserError(f"--file-pattern {pattern!r} with --vllm-save-hook: vLLM's hook fills in only {{rank}} "
                        "and {part}")


def check_upload(url: str, early: argparse.Namespace) -> Path:
    """An S3 prefix a save can take: the bucket there, nothing at the prefix; the local folder
    the checkpoint is written into first (emptied: what a failed save left there)."""
    if early.replace:
        raise UserError("--replace is refused on s3:// (a reader could mix the old checkpoint's objects with the "
                        "new one's); save to a new prefix")
    s3.check_empty(url)
    local = s3.upload_folder(url)
    shutil.rmtree(local, ignore_errors=True)
    return local


def check_source(source: Path, *, local: bool) -> None:
    if local and not has_weights(source):
        raise UserError(f"model folder {source} holds no weights (*.safetensors, *.bin, *.pt); pass a complete model")
    if is_checkpoint(source):
        manifest = read_manifest(source)
        origin = f" ({manifest.source})" if manifest else ""
        raise UserError(f"model {source} is a pre-sharded checkpoint, which vLLM cannot load as a source; "
                        f"save from the model it was made from{origin}, or copy the folder as it is")


def check_output(source: Path, output: Path, *, replace: bool) -> None:
    if output == source or source in output.parents:
        raise UserError(f"output {output} is inside the source model {source}; choose a folder outside it")
    if output in source.parents:
        raise UserError(f"output {output} holds the source model {source}; choose a folder that does not")
    if output.exists() and not output.is_dir():
        raise UserError(f"output {output} exists and is not a folder; choose another --output")
    if output.is_dir() and any(output.iterdir()):
        if not replace:
            raise UserError(f"output {output} exists and is not empty; choose another --output or pass --replace")
        if not is_checkpoint(output):
            raise UserError(f"output {output} is not a checkpoint, and --replace replaces only checkpoints; "
                            "choose another --output, or empty it yourself")
    parent = output.parent
    while not parent.exists():
        parent = parent.parent
    if not os.access(parent, os.W_OK | os.X_OK):
        raise UserError(f"cannot write to {parent}; choose an --output you can write to")


def check_pattern(pattern: str, tensor_parallel_size: int, pipeline_parallel_size: int) -> None:
    if problem := pattern_problem(pattern, tensor_parallel_size, pipeline_parallel_size):
        raise UserError(f"--file-pattern {pattern!r} {problem}; or leave it out for vLLM's default")
