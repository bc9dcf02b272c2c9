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
import sys
import time
from datetime import datetime, timezone
from pathlib import Path

from presharded.caches_cli import after_save
from presharded.cli import apply_engine_defaults, early_parse, full_parse, parse_size, positive_size
from presharded.errors import engine_refusals, exits_cleanly
from presharded.handoff import SAVE_FORMAT, SAVE_RECORDS, RankRecord, SaveRequest, check_records
from presharded.lifetime import engine_dies_with_this_process, fail, interrupted
from presharded.manifest import CopiedFile, Manifest, hash_file, write_manifest
from presharded.nodes import Liveness, Node, finish_other_node, take_shared_files
from presharded.save_checks import SaveTarget, check_save
from presharded.source import copy_model_files
from presharded.staging import output_locked, publish, staging_for


def add_flags(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--output", required=True, help="folder to write the checkpoint to")
    parser.add_argument("--max-file-size", type=positive_size, default=parse_size("5GiB"),
                        help="largest safetensors file, e.g. 5GiB (default) or 500MB")
    parser.add_argument("--file-pattern", default=None,
                        help="file names; default: vLLM's model-rank-{rank}-part-{part}.safetensors, "
                        "or model-pp-{pp_rank}-tp-{tp_rank}-part-{part}.safetensors with pipeline stages")
    parser.add_argument("--replace", action="store_true",
                        help="replace the checkpoint in --output, once the new one is complete")
    parser.add_argument("--start-caches", action=argparse.BooleanOptionalAction, default=None,
                        help="then start vLLM once on the checkpoint with these engine flags and keep what it "
                        "compiled in it (presharded-caches); default: on GPUs")
    parser.add_argument("--json", action="store_true", help="print the result as one JSON object")


@exits_cleanly
def main() -> None:
    t0 = time.perf_counter()
    # Checks first: importing vLLM takes seconds, bad input should not wait for it.
    early = early_parse(sys.argv[1:], add_flags, __doc__)
    target = check_save(early)
    node = Node.from_args(early)  # one of several machines (--nnodes): presharded/nodes.py
    nodes = Liveness(node, "the save", fail) if node.count > 1 else None  # a node that dies ends the others
    with output_locked(target.output, node.rank):  # a second save to the same output is refused here
        from vllm import LLM, EngineArgs

        from presharded.vllm_compat import is_cpu, run_workers, shut_down

        args, parser = full_parse(sys.argv[1:], add_flags, __doc__)
        apply_engine_defaults(args, parser, saving=True)
        engine_args = EngineArgs.from_cli_args(args)
        engine_dies_with_this_process()
        with staging_for(target.output, node.rank) as staging:
            # Each worker saves its own slice while it loads: see presharded/save_loader.py.
            request = SaveRequest(str(staging), target.file_pattern, args.max_file_size, engine_args.load_format,
                                  node.rank)
            engine_args.load_format = SAVE_FORMAT
            engine_args.model_loader_extra_config = request.as_extra_config(engine_args.model_loader_extra_config)
            engine_args.worker_extension_cls = SAVE_RECORDS  # the script asks the workers what they wrote
            if not node.is_driver:  # this node's workers only; the driver writes the manifest
                with engine_refusals():
                    run_workers(engine_args, nodes.wait_for_driver)
                manifest = finish_other_node(staging, target.source, node)
            else:
                with engine_refusals():
                    llm = LLM.from_engine_args(engine_args)  # workers write as they load
                t_engine = time.perf_counter()
                records = check_records([RankRecord.from_dict(r) for r in llm.collective_rpc("presharded_record")],
                                        target.tensor_parallel_size, target.pipeline_parallel_size)
                elsewhere = take_shared_files(records, staging)
                copied = copy_model_files(target.source, staging)
                manifest = make_manifest(records, target, args, early.model, staging, copied, node.count)
                write_manifest(staging, manifest)
                if elsewhere:  # nodes with disks of their own publish their files with this manifest
                    llm.collective_rpc("presharded_manifest", args=(manifest.to_json(), sorted(elsewhere)))
            if interrupted():  # a Ctrl-C that Python or vLLM swallowed
                raise KeyboardInterrupt
            if manifest is not None:
                publish(staging, target.output)
        if nodes and node.is_driver:
            nodes.finish()  # the other nodes publish their files now
        t_saved = time.perf_counter()
        caches = None
        if node.is_driver and node.count == 1 and (args.start_caches or (args.start_caches is None and not is_cpu())):
            shut_down(llm)  # the caches' start needs the devices
            del llm
            caches = after_save(target.output, sys.argv[1:])  # presharded/caches_cli.py

    if manifest is None:
        print(f"{node}: the driver moved this node's files into its own folder (they share one)", file=sys.stderr)
        return
    here = [s for s in manifest.shards if (target.output / s.path).exists()]
    if not node.is_driver:
        print(target.output)
        print(f"{node}: saved {len(here)} of the checkpoint's {len(manifest.shards)} files", file=sys.stderr)
        return
    # Ranks write in parallel: the slowest one sets the pace.
    write_seconds = max(rank.write_seconds for rank in records)
    seconds = {"engine": round(t_engine - t0, 2), "write": round(write_seconds, 3), "save": round(t_saved - t0, 2),
               "caches": round(time.perf_counter() - t_saved, 2), "total": round(time.perf_counter() - t0, 2)}
    if args.json:
        print(json.dumps({"output": str(target.output), "files": len(manifest.shards), "bytes": manifest.total_bytes,
                          "write_gbps": round(manifest.total_bytes / write_seconds / 1e9, 3), "caches": caches,
                          "seconds": seconds}))
    else:
        print(target.output)
        print(f"saved {manifest.total_bytes / 1e9:.2f} GB in {len(manifest.shards)} files for "
              f"TP={target.tensor_parallel_size} PP={target.pipeline_parallel_size} in {seconds['save']:.1f} s"
              + (f", start-up caches {caches} in {seconds['caches']:.1f} s" if caches else ""), file=sys.stderr)
        if len(here) < len(manifest.shards):
            print(f"this folder holds {len(here)} of them; the other nodes hold theirs: see the README, "
                  "\"Several machines\"", file=sys.stderr)


def make_manifest(records: list[RankRecord], target: SaveTarget, args: argparse.Namespace, model: str,
                  staging: Path, copied: list[str], nodes: int) -> Manifest:
    from vllm import __version__ as vllm_version

    return Manifest(
        vllm_version=vllm_version,
        tensor_parallel_size=target.tensor_parallel_size,
        pipeline_parallel_size=target.pipeline_parallel_size,
        enable_expert_parallel=args.enable_expert_parallel,
        file_pattern=target.file_pattern,
        dtype=records[0].dtype,
        quantization=records[0].quantization,
        online_quantization=records[0].online_quantization,
        aliases={name: saved for rank in records for name, saved in rank.aliases.items()},
        architecture=records[0].architecture,
        source=model,
        created=datetime.now(timezone.utc).isoformat(timespec="seconds"),
        shards=[dataclasses.replace(s, node=rank.node) for rank in records for s in rank.shards],
        files=[CopiedFile(f, (staging / f).stat().st_size, hash_file(staging / f)) for f in copied],
        nodes=nodes,
    )


if __name__ == "__main__":
    main()
