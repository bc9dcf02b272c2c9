"""Save a model as a pre-sharded checkpoint: one set of safetensors files per
tensor-parallel (and pipeline-parallel) rank, each holding that rank's slice
of every weight, plus the config, tokenizer files and a manifest.

    python save_sharded_state.py --model meta-llama/Llama-3.1-70B-Instruct \\
        --tensor-parallel-size 8 --output /models/llama-70b-tp8

Every vLLM engine flag works (--quantization, --dtype, ...). Load the result
with load_sharded_state.py, or with vLLM: --load-format sharded_state.
"""

import os

os.environ.setdefault("VLLM_LOGGING_STREAM", "ext://sys.stderr")  # stdout is for results

import argparse
import dataclasses
import json
import shutil
import sys
import time
from datetime import datetime, timezone
from pathlib import Path

from presharded.cli import apply_engine_defaults, early_parse, full_parse, parse_size
from presharded.errors import UserError, exits_cleanly, raise_if_interrupted, remember_interrupts
from presharded.files import check_output, copy_model_files, has_weights, publish, resolve_model, start_staging
from presharded.manifest import CopiedFile, Manifest, Shard, check_pattern, default_pattern, hash_file, write_manifest
from presharded.writer import SAVE_FORMAT, SaveRequest, read_rank_records, write_failure

SOURCE_FORMATS = ("auto", "safetensors", "hf", "pt", "npcache", "fastsafetensors", "mistral")


def add_flags(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--output", required=True, help="folder to write the checkpoint to")
    parser.add_argument("--max-file-size", type=parse_size, default=parse_size("5GiB"),
                        help="largest safetensors file, e.g. 5GiB (default) or 500MB")
    parser.add_argument("--file-pattern", default=None,
                        help="file names; default: vLLM's model-rank-{rank}-part-{part}.safetensors, "
                        "or model-pp-{pp_rank}-tp-{tp_rank}-part-{part}.safetensors with pipeline stages")
    parser.add_argument("--replace", action="store_true",
                        help="replace a non-empty --output, once the new checkpoint is complete")
    parser.add_argument("--json", action="store_true", help="print the result as one JSON object")


@exits_cleanly
def main() -> None:
    t0 = time.perf_counter()
    # Checks first: importing vLLM takes seconds, bad input should not wait for it.
    early = early_parse(sys.argv[1:], add_flags, __doc__)
    if early.model is None:
        raise UserError("--model is required: a model folder or hub id")
    source = resolve_model(early.model, early.revision)
    if Path(early.model).expanduser().is_dir() and not has_weights(source):
        raise UserError(f"model folder {source} holds no weights (*.safetensors, *.bin, *.pt); pass a complete model")
    output = Path(early.output).resolve()
    check_output(source, output, replace=early.replace)
    if (early.load_format or "auto") not in SOURCE_FORMATS:
        raise UserError(f"--load-format {early.load_format} cannot be a source; use one of {', '.join(SOURCE_FORMATS)}")
    if (early.data_parallel_size or 1) > 1:
        raise UserError("save with --data-parallel-size 1: every data-parallel replica loads the same files")
    tp, pp = early.tensor_parallel_size or 1, early.pipeline_parallel_size or 1
    pattern = early.file_pattern or default_pattern(pp)
    check_pattern(pattern, tp, pp)

    from vllm import LLM, EngineArgs, __version__ as vllm_version

    args, parser = full_parse(sys.argv[1:], add_flags, __doc__)
    apply_engine_defaults(args, parser, saving=True)
    engine_args = EngineArgs.from_cli_args(args)
    remember_interrupts()
    staging = start_staging(output)
    try:
        # Each worker saves its own slice while it loads: see presharded/save_loader.py.
        request = SaveRequest(str(staging), pattern, args.max_file_size, engine_args.load_format)
        engine_args.load_format = SAVE_FORMAT
        engine_args.model_loader_extra_config = {
            **(engine_args.model_loader_extra_config or {}),
            SAVE_FORMAT: dataclasses.asdict(request),
        }
        llm = LLM.from_engine_args(engine_args)
        del llm
        t_engine = time.perf_counter()

        ranks = read_rank_records(staging, tp, pp)
        copied = copy_model_files(source, staging)
        manifest = Manifest(
            vllm_version=vllm_version,
            tensor_parallel_size=tp,
            pipeline_parallel_size=pp,
            enable_expert_parallel=args.enable_expert_parallel,
            file_pattern=pattern,
            dtype=ranks[0]["dtype"],
            quantization=ranks[0]["quantization"],
            online_quantization=ranks[0]["online_quantization"],
            architecture=ranks[0]["architecture"],
            source=early.model,
            created=datetime.now(timezone.utc).isoformat(timespec="seconds"),
            shards=[Shard(**s) for rank in ranks for s in rank["shards"]],
            files=[CopiedFile(f, (staging / f).stat().st_size, hash_file(staging / f)) for f in copied],
        )
        write_manifest(staging, manifest)
        raise_if_interrupted()
        publish(staging, output)
    except BaseException as e:
        reason = write_failure(staging, e)
        shutil.rmtree(staging, ignore_errors=True)
        if reason:
            raise UserError(f"{reason}; nothing was saved: free space or choose another --output") from None
        raise

    # Ranks write in parallel: the slowest one sets the pace.
    write_seconds = max(rank["write_seconds"] for rank in ranks)
    seconds = {"engine": round(t_engine - t0, 2), "write": round(write_seconds, 3),
               "total": round(time.perf_counter() - t0, 2)}
    if args.json:
        print(json.dumps({"output": str(output), "files": len(manifest.shards), "bytes": manifest.total_bytes,
                          "write_gbps": round(manifest.total_bytes / write_seconds / 1e9, 3), "seconds": seconds}))
    else:
        print(output)
        print(f"saved {manifest.total_bytes / 1e9:.2f} GB in {len(manifest.shards)} files "
              f"for TP={tp} PP={pp} in {seconds['total']:.1f} s", file=sys.stderr)


if __name__ == "__main__":
    main()
