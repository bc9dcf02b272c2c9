"""Print a pre-sharded checkpoint's manifest as a short summary, or as JSON."""

import argparse
import dataclasses
import json
from collections import Counter
from pathlib import Path

from presharded import s3
from presharded.errors import UserError, exits_cleanly
from presharded.manifest import MANIFEST_NAME, Manifest, read_manifest
from presharded.snapshot_sets import is_kept


def summary(manifest: Manifest, folder: str | Path) -> str:
    per_rank = Counter((s.pp_rank, s.tp_rank) for s in manifest.shards)
    largest = max(s.size for s in manifest.shards)
    lines = [
        f"{folder}",
        f"  model         {manifest.architecture} from {manifest.source}",
        f"  layout        TP={manifest.tensor_parallel_size} PP={manifest.pipeline_parallel_size}"
        + (" EP" if manifest.enable_expert_parallel else ""),
        f"  dtype         {manifest.dtype}" + (f", quantization {manifest.quantization}" if manifest.quantization else "")
        + (" (applied while loading: load with fast_sharded_state)" if manifest.online_quantization else ""),
        f"  weights       {manifest.total_bytes / 1e9:.3f} GB in {len(manifest.shards)} files "
        f"({max(per_rank.values())} per rank at most, largest {largest / 1e6:.1f} MB)",
        f"  files         {manifest.file_pattern}",
        f"  also copied   {', '.join(f.path for f in manifest.files) or 'nothing'}",
        f"  saved         {manifest.created} with vLLM {manifest.vllm_version}",
    ]
    for name, entries in manifest.caches.items():
        lines.append(f"  start caches  {name} ({sum(e.size for e in entries) / 1e6:.1f} MB)")
    for name, entries in manifest.snapshots.items():
        kept = sum(e.size for e in entries if is_kept(e.path, name))
        lines.append(f"  snapshot      {name} (image {(sum(e.size for e in entries) - kept) / 1e9:.2f} GB, "
                     f"weights kept beside it {kept / 1e6:.1f} MB)")
    return "\n".join(lines)


@exits_cleanly
def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("checkpoint", help="a checkpoint folder, or s3://BUCKET/PREFIX")
    parser.add_argument("--json", action="store_true", help="print the whole manifest as JSON")
    args = parser.parse_args()
    folder = s3.fetch(args.checkpoint) if s3.is_s3(args.checkpoint) else Path(args.checkpoint)
    if not folder.is_dir():
        what = "is a file" if folder.exists() else "does not exist"
        raise UserError(f"{folder} {what}; pass a checkpoint folder written by save_sharded_state.py")
    manifest = read_manifest(folder)
    if manifest is None:
        raise UserError(f"{folder} has no {MANIFEST_NAME}; pass a folder written by save_sharded_state.py")
    if args.json:
        print(json.dumps(dataclasses.asdict(manifest)))
    else:
        print(summary(manifest, args.checkpoint))


if __name__ == "__main__":
    main()
