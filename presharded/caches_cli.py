"""Add start-up caches to a checkpoint: start vLLM once on it with the engine
flags given (compilation and CUDA graphs on unless told otherwise) and keep
what that start compiled inside the checkpoint, as the set for this kind of
machine and the checkpoint's layout. Later starts of the checkpoint with the
same flags, on a machine of the same kind, use it (load_sharded_state.py
reports `caches: hit`).

    presharded-caches /models/llama-70b-tp8 [--max-model-len 8192 ...]
"""

import argparse
import os
import subprocess
import sys
from pathlib import Path

from presharded.errors import UserError, exits_cleanly
from presharded.load_checks import check_checkpoint
from presharded.manifest import write_manifest

ROOT = Path(__file__).resolve().parent.parent


@exits_cleanly
def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("checkpoint", type=Path)
    args, engine_flags = parser.parse_known_args()
    manifest = check_checkpoint(args.checkpoint, require_manifest=True)

    from presharded import start_caches

    name = start_caches.set_name(manifest.tensor_parallel_size, manifest.pipeline_parallel_size)
    workspace = start_caches.fresh_workspace(args.checkpoint, manifest)
    cmd = [sys.executable, str(ROOT / "load_sharded_state.py"), "--model", str(workspace / "model"),
           "--max-tokens", "1", "--no-start-caches", *engine_flags]
    print(f"starting vLLM on {args.checkpoint} to fill the caches {name}", file=sys.stderr, flush=True)
    proc = subprocess.run(cmd, env={**os.environ, **start_caches.engine_env(workspace)}, stdout=subprocess.DEVNULL)
    if proc.returncode != 0:
        raise UserError(f"vLLM did not start on {args.checkpoint} (exit {proc.returncode}; its messages are above); "
                        "no caches were added")
    manifest.caches[name] = start_caches.keep(workspace, args.checkpoint, manifest, name)
    write_manifest(args.checkpoint, manifest)
    size = sum(e.size for e in manifest.caches[name])
    print(f"{args.checkpoint}: start-up caches {name} ({len(manifest.caches[name])} files, {size / 1e6:.1f} MB)")


if __name__ == "__main__":
    main()
