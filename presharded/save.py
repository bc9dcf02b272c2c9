"""What save_sharded_state.py does around vLLM's engine, step by step in the
order the script calls them: the checks before vLLM is imported, the output
locked, the engine's workers asked to write their ranks as they load, the
manifest, the checkpoint published once complete, its start-up caches, the
report. Across several nodes (--nnodes) each node runs its own workers and
the driver (node 0) writes the manifest and publishes."""

import argparse
import dataclasses
import json
import shutil
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from datetime import datetime, timezone
from pathlib import Path

from presharded.engine_defaults import apply_engine_defaults
from presharded.engine_output import engine_refusals
from presharded.errors import UserError
from presharded.flags import AddFlags, parse_engine_flags, parse_for_checks, parse_size, positive_size
from presharded.manifest import (CopiedFile, Manifest, Shard, hash_file, hash_header, read_manifest, render,
                                 write_manifest)
from presharded import progress, s3
from presharded.nodes import Liveness, Node
from presharded.save_checks import HOOK_DROP, SaveTarget, check_save
from presharded.save_messages import RankRecord, SaveRequest, check_records
from presharded.shutdown import engine_dies_with_this_process, fail, interrupted
from presharded.source_model import copy_model_files
from presharded.staging import output_locked, publish, staging_for


def add_save_flags(parser: argparse.ArgumentParser) -> None:
    """A save's flags, beside vLLM's engine flags."""
    parser.add_argument("--output", required=True, help="folder to write the checkpoint to, or s3://BUCKET/PREFIX")
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
    parser.add_argument("--vllm-save-hook", action="store_true",
                        help="save as vLLM's own example does: the model loaded as usual, then each worker saves "
                        "what it holds (the engine's save_sharded_state); refused where that is known not to load "
                        "back (quantized, mixture-of-experts, pipeline stages, vLLM's CPU build)")
    parser.add_argument("--json", action="store_true", help="print the result as one JSON object")


class Save:
    """One save, from the checks made before vLLM is imported to the report: made by `Save.check`
    (the constructor keeps what it is given); each step the script calls fills in what it learns."""

    def __init__(self, argv: list[str], add_flags: AddFlags, doc: str, early: argparse.Namespace,
                 target: SaveTarget, node: Node, nodes: Liveness | None, started: float) -> None:
        self.argv, self.add_flags, self.doc, self.early, self.target = argv, add_flags, doc, early, target
        self.node, self.nodes, self.started = node, nodes, started  # nodes: with --nnodes, each watching the others
        self.folder: Path | None = None  # the staging folder the workers write into
        self.args: argparse.Namespace | None = None  # every engine flag, once vLLM is imported
        self.llm = None  # the engine, on the driver
        self.manifest: Manifest | None = None
        self.records: list[RankRecord] = []
        self.caches: str | None = None
        self.uploaded: dict[str, str] = {}  # with s3:// across nodes: the ETags of what the other nodes uploaded
        self.seconds: dict[str, float] = {}

    @classmethod
    def check(cls, argv: list[str], add_flags: AddFlags, doc: str) -> "Save":
        """Before vLLM is imported: the flags the checks need parsed, the request checked (the source,
        the output, the file pattern); across nodes, every node agreeing on what it saves."""
        started = time.perf_counter()
        early = parse_for_checks(argv, add_flags, doc)
        progress.decide(quiet=early.json)  # bars on a terminal; also the workers' (presharded/writer.py)
        target = check_save(early)
        node = Node.from_args(early)
        nodes = Liveness(node, "the save", fail) if node.count > 1 else None  # a dead node ends all
        if nodes:  # every node saves the same model the same way, or none starts
            nodes.agree({"model": early.model, "output": str(target.upload or target.output),
                         "tensor_parallel_size": target.tensor_parallel_size,
                         "pipeline_parallel_size": target.pipeline_parallel_size,
                         "file_pattern": target.file_pattern, "max_file_size": early.max_file_size,
                         "load_format": early.load_format})
        return cls(argv, add_flags, doc, early, target, node, nodes, started)

    @contextmanager
    def output_locked(self) -> Iterator[None]:
        """One save to an output at a time; vLLM's engine ends with this script, however it ends."""
        with output_locked(self.target.output, self.node.rank):
            engine_dies_with_this_process()
            yield

    @contextmanager
    def staging(self) -> Iterator[Path]:
        """A staging folder for the workers to write into, published as --output once
        the checkpoint is complete; removed if anything fails."""
        with staging_for(self.target.output, self.node.rank) as folder:
            self.folder = folder
            yield folder
            if interrupted():  # a Ctrl-C that Python or vLLM swallowed
                raise KeyboardInterrupt
            if self.manifest is not None:
                publish(folder, self.target.output)
        if self.nodes and self.node.is_driver:
            self.nodes.finish()  # the other nodes publish their files now
        self.seconds["save"] = round(time.perf_counter() - self.started, 2)

    def engine_flags(self) -> argparse.Namespace:
        """Once vLLM is imported: every engine flag (vLLM's parser) and ours; a save's defaults where the
        user set none (it serves no requests), workable ones on CPU."""
        from presharded.vllm_compat import is_cpu

        args, parser = parse_engine_flags(self.argv, self.add_flags, self.doc)
        if args.vllm_save_hook and is_cpu():
            raise UserError("--vllm-save-hook on vLLM's CPU build: it repacks the linear layers' weights after "
                            "loading, and vLLM's hook then saves none of them" + HOOK_DROP)
        apply_engine_defaults(args, parser, saving=True)
        self.args = args
        return args

    def request(self, engine_args) -> dict:
        """The loader config that asks our saving load format (presharded/save_loader.py, registered
        with vLLM by this package's plugin) to write each rank into the staging folder as it loads it,
        reading the source with the load format the user asked for."""
        request = SaveRequest(str(self.folder), self.target.file_pattern, self.args.max_file_size,
                              engine_args.load_format, self.node.rank)
        return request.as_extra_config(engine_args.model_loader_extra_config)

    @contextmanager
    def engine_start(self) -> Iterator[None]:
        """Around building the engine: a refusal of ours inside it ends the script in one line."""
        with engine_refusals():
            yield
        self.seconds["engine"] = round(time.perf_counter() - self.started, 2)

    @contextmanager
    def hook_save(self) -> Iterator[None]:
        """Around vLLM's hook: its seconds; a failure to write, or vLLM's own error, in one line (on vLLM
        0.26 its hook cannot save MLA's matrices made after loading: `view size is not compatible ...`)."""
        start = time.perf_counter()
        try:
            with engine_refusals():
                yield
        except UserError:
            raise
        except Exception as e:
            words = (str(e).strip().splitlines() or [type(e).__name__])[-1]
            raise UserError(f"vLLM's save hook failed: {words}" + HOOK_DROP) from None
        self.seconds["write"] = time.perf_counter() - start

    def records_on_disk(self, llm) -> list[dict]:
        """After vLLM's hook saved: what each rank wrote, read back from the staging folder, as our
        workers report it."""
        from presharded.vllm_compat import model_facts

        records = []
        for rank in range(self.target.tensor_parallel_size):
            shards = []
            while (path := self.folder / render(self.target.file_pattern, pp_rank=0, tp_rank=rank,
                                                 part=len(shards))).is_file():
                shards.append(Shard(path.name, 0, rank, len(shards), path.stat().st_size, hash_file(path),
                                    hash_header(path)))
            records.append({"shards": [dataclasses.asdict(x) for x in shards], **model_facts(llm),
                            "online_quantization": False, "aliases": {}, "write_seconds": self.seconds["write"],
                            "folder": str(self.folder)})
        return records

    def write_manifest(self, records: list[dict], llm) -> None:
        """On the driver, once every worker has written: what they wrote (`records`), the model's
        config and tokenizer beside it, and the manifest, written last."""
        self.records = check_records([RankRecord.from_dict(r) for r in records],
                                     self.target.tensor_parallel_size, self.target.pipeline_parallel_size)
        elsewhere = take_shared_files(self.records, self.folder)
        copied = copy_model_files(self.target.source, self.folder)
        self.manifest = make_manifest(self.records, self.target, self.args, self.early.model, self.folder, copied,
                                      self.node.count)
        write_manifest(self.folder, self.manifest)
        if elsewhere and self.target.upload:  # nodes with disks of their own upload their files now
            for etags in llm.collective_rpc("presharded_upload", args=(self.target.upload, sorted(elsewhere))):
                self.uploaded.update(etags)
            print(f"the other nodes ({', '.join(map(str, sorted(elsewhere)))}) uploaded {len(self.uploaded)} files "
                  f"of theirs to {self.target.upload}", file=sys.stderr)
        elif elsewhere:  # or publish them with this manifest
            llm.collective_rpc("presharded_manifest", args=(self.manifest.to_json(), sorted(elsewhere)))
        self.llm = llm

    def run_workers(self, engine_args) -> None:
        """On another node: its workers, until the driver is done; then its own files published, if it keeps them."""
        from presharded.vllm_compat import run_workers

        with engine_refusals():
            run_workers(engine_args, self.nodes.wait_for_driver)
        if not self.target.upload:  # to S3, its workers uploaded its files (or the driver took them)
            self.manifest = finish_other_node(self.folder, self.target.source, self.node)

    def wants_start_caches(self) -> bool:
        from presharded.vllm_compat import is_cpu

        wanted = self.args.start_caches
        return self.node.is_driver and self.node.count == 1 and (wanted or (wanted is None and not is_cpu()))

    def add_start_caches(self) -> None:
        """vLLM started once more, on the checkpoint, with the save's engine flags: what it
        compiled kept in the checkpoint (presharded/start_caches.py). A failure is a warning."""
        from presharded.start_caches import record_set
        from presharded.vllm_compat import shut_down

        shut_down(self.llm)  # the caches' start needs the devices
        started = time.perf_counter()
        try:
            self.caches = record_set(self.target.output, serving_flags(self.argv))
        except UserError as e:
            print(f"warning: {e}; the checkpoint is complete without them (add them with presharded-caches)",
                  file=sys.stderr)
        self.seconds["caches"] = round(time.perf_counter() - started, 2)

    def upload(self) -> None:
        """With --output s3://...: the checkpoint uploaded, the manifest last; the local copy removed."""
        if self.target.upload and self.manifest is not None:
            started = time.perf_counter()
            print(f"uploading {self.manifest.total_bytes / 1e9:.2f} GB to {self.target.upload}", file=sys.stderr)
            s3.upload(self.target.output, self.target.upload, self.uploaded)
            shutil.rmtree(self.target.output)
            self.seconds["upload"] = round(time.perf_counter() - started, 2)

    def report(self) -> None:
        """The result: the checkpoint's path on stdout (or JSON), what was saved on stderr."""
        output, manifest = self.target.upload or self.target.output, self.manifest
        if manifest is None:
            print(f"{self.node}: the driver " + (f"uploads the manifest to {output} (this node's workers uploaded "
                  "its files, or the driver took them)" if self.target.upload else "moved this node's files into "
                  "its own folder (they share one)"), file=sys.stderr)
            return
        here = manifest.shards if self.target.upload else [s for s in manifest.shards if (output / s.path).exists()]
        if not self.node.is_driver:
            print(output)
            print(f"{self.node}: saved {len(here)} of the checkpoint's {len(manifest.shards)} files", file=sys.stderr)
            return
        write = max(rank.write_seconds for rank in self.records)  # ranks write in parallel: the slowest sets the pace
        seconds = {"engine": self.seconds["engine"], "write": round(write, 3), "save": self.seconds["save"],
                   "caches": self.seconds.get("caches", 0.0), "upload": self.seconds.get("upload", 0.0),
                   "total": round(time.perf_counter() - self.started, 2)}
        if self.args.json:
            print(json.dumps({"output": str(output), "files": len(manifest.shards), "bytes": manifest.total_bytes,
                              "write_gbps": round(manifest.total_bytes / write / 1e9, 3), "caches": self.caches,
                              "seconds": seconds, "ranks": [rank_written(r) for r in self.records]}))
            return
        print(output)
        print(f"saved {manifest.total_bytes / 1e9:.2f} GB in {len(manifest.shards)} files for "
              f"TP={self.target.tensor_parallel_size} PP={self.target.pipeline_parallel_size} in {seconds['save']:.1f} s"
              + (f", start-up caches {self.caches} in {seconds['caches']:.1f} s" if self.caches else ""),
              file=sys.stderr)
        if len(here) < len(manifest.shards):
            print(f"this folder holds {len(here)} of them; the other nodes hold theirs: see docs/nodes.md",
                  file=sys.stderr)


def rank_written(record: RankRecord) -> dict:
    """What one rank wrote and how fast, for --json."""
    nbytes, first = sum(s.size for s in record.shards), record.shards[0]  # check_records: every rank wrote some
    return {"tp_rank": first.tp_rank, "pp_rank": first.pp_rank, "bytes": nbytes,
            "write_seconds": round(record.write_seconds, 3),
            "write_gbps": round(nbytes / record.write_seconds / 1e9, 3) if record.write_seconds else None}


def make_manifest(records: list[RankRecord], target, args: argparse.Namespace, model: str, staging: Path,
                  copied: list[str], nodes: int) -> Manifest:
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


def serving_flags(save_argv: list[str]) -> list[str]:
    """The save's command line less what a load takes from the checkpoint or does not know."""
    parser = argparse.ArgumentParser(add_help=False, allow_abbrev=False)
    for flag in ["--model", "--output", "--max-file-size", "--file-pattern", "--load-format", "--revision",
                 "--tensor-parallel-size", "-tp", "--pipeline-parallel-size", "-pp"]:
        parser.add_argument(flag)
    for flag in ["--replace", "--json", "--start-caches", "--no-start-caches"]:
        parser.add_argument(flag, action="store_true")
    return parser.parse_known_args(save_argv)[1]


def take_shared_files(records: list[RankRecord], staging: Path) -> set[int]:
    """Move the files other nodes wrote into the driver's `staging`, where the
    driver sees them (a folder the nodes share); the nodes whose files stay on
    disks of their own, for them to publish."""
    elsewhere = set()
    for record in records:
        folder = Path(record.folder)
        if all(present(staging, s) for s in record.shards):
            continue
        if folder != staging and all(present(folder, s) for s in record.shards):
            for shard in record.shards:
                shutil.move(folder / shard.path, staging / shard.path)
        elif record.node != 0:
            elsewhere.add(record.node)
        else:  # a worker the driver's script started on another machine (Ray): no script there publishes
            raise UserError(f"the files of rank pp={record.shards[0].pp_rank} tp={record.shards[0].tp_rank}, "
                            f"written on {record.host}, are not in {folder} here; with Ray, save into a folder "
                            "that every node shares, or use vLLM's own executor across nodes (--nnodes)")
    return elsewhere


def present(folder: Path, shard) -> bool:
    return (folder / shard.path).is_file() and (folder / shard.path).stat().st_size == shard.size


def finish_other_node(staging: Path, source: Path, node: Node) -> Manifest | None:
    """After the driver is done: the manifest it sent if this node keeps its
    own files (then they are published here with the model's config and
    tokenizer), None if the driver took them into its folder."""
    manifest = read_manifest(staging)
    if manifest is None:
        if any(staging.glob("*.safetensors")):
            raise UserError(f"{node}: the driver ({node.master_addr}) ended before the save was complete; "
                            "nothing was saved here: see the driver's error, and save again on every node")
        return None
    copy_model_files(source, staging)
    for entry in manifest.files:
        if hash_file(staging / entry.path) != entry.blake3:
            raise UserError(f"{node}: {entry.path} of {source} is not the driver's; "
                            "save from the same model files on every node")
    return manifest

