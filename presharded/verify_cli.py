"""Check a checkpoint against its manifest: every file present, sizes and
hashes equal, no stray files. With --source, also the expensive proof: the
source model and the checkpoint give the same greedy tokens on a few prompts.
Other flags (e.g. --enforce-eager, --trust-remote-code) go to both engines."""

import argparse
import json
from pathlib import Path

from presharded import progress, s3
from presharded.load_checks import verify_checkpoint
from presharded.errors import UserError, exits_cleanly
from presharded.formats import FAST_FORMAT, SHARDED_STATE
from presharded.generate import PROMPTS, greedy_tokens
from presharded.manifest import read_manifest
from presharded.nodes import Node


def as_flags(settings: dict) -> list[str]:
    flags = []
    for dest, value in settings.items():
        if value is None or value is False:
            continue
        flag = "--" + dest.replace("_", "-")
        flags += [flag] if value is True else [flag, json.dumps(value) if isinstance(value, dict) else str(value)]
    return flags


@exits_cleanly
def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("checkpoint", help="a checkpoint folder, or s3://BUCKET/PREFIX")
    parser.add_argument("--source", help="the model it was saved from: compare greedy tokens too")
    parser.add_argument("--json", action="store_true", help="print the result as one JSON object")
    parser.add_argument("--node-rank", type=int, default=None,
                        help="saved by several nodes onto disks of their own: check the ranks of this node only")
    args, engine_extra = parser.parse_known_args()
    progress.decide(quiet=args.json)
    url = args.checkpoint if s3.is_s3(args.checkpoint) else None
    folder = s3.fetch(url) if url else Path(args.checkpoint)

    node = Node()
    if args.node_rank is not None and (saved := read_manifest(folder)):
        if not 0 <= args.node_rank < saved.nodes:
            raise UserError(f"--node-rank {args.node_rank}: {args.checkpoint} was saved by {saved.nodes} node(s), "
                            f"ranked 0 to {saved.nodes - 1}")
        node = Node(args.node_rank, saved.nodes)
    manifest = verify_checkpoint(folder, node, url)
    shards = manifest.shards_of(node.ranks(manifest.tensor_parallel_size, manifest.pipeline_parallel_size))
    cached = sum(len(entries) for entries in manifest.caches.values())
    snapshot = sum(len(entries) for entries in manifest.snapshots.values())
    files = len(shards) + len(manifest.files) + cached + snapshot
    result = {"checkpoint": str(args.checkpoint), "files": files, "start_cache_files": cached,
              "snapshot_files": snapshot, "hashes_match": True}
    lines = [f"ok: {files} files in {args.checkpoint} ({cached} of them start-up caches, {snapshot} engine "
             "snapshots) match the manifest's sizes and hashes"]
    if args.source:
        # The same layout and dtype for both; the file pattern only concerns the checkpoint.
        layout = manifest.engine_defaults()
        pattern = layout.pop("model_loader_extra_config", {})
        flags = as_flags(layout) + engine_extra
        # Each engine in a process of its own: on a GPU a second engine in one process can give other tokens.
        source = greedy_tokens([(args.source, "auto")], flags)[0]["token_ids"]
        load_format = FAST_FORMAT if manifest.online_quantization or url else SHARDED_STATE
        pattern_flags = as_flags(pattern and {"model_loader_extra_config": pattern})
        saved = greedy_tokens([(args.checkpoint, load_format)], ["--no-start-caches", *flags, *pattern_flags])
        saved = saved[0]["token_ids"]
        for prompt, a, b in zip(PROMPTS, source, saved):
            if a != b:
                raise UserError(f"greedy tokens differ on {prompt!r}: source {a}, checkpoint {b}; save it again")
        result["tokens_equal_on_prompts"] = len(PROMPTS)
        lines.append(f"ok: {args.source} and the checkpoint give the same greedy tokens on {len(PROMPTS)} prompts")
    print(json.dumps(result) if args.json else "\n".join(lines))


if __name__ == "__main__":
    main()
