"""Add start-up caches to a checkpoint: start vLLM once on it with the engine
flags given (compilation and CUDA graphs on unless told otherwise) and keep
what that start compiled inside the checkpoint, as the set for this kind of
machine and the checkpoint's layout. Later starts of the checkpoint with the
same flags, on a machine of the same kind, use it (load_sharded_state.py
reports `caches: hit`). save_sharded_state.py does this by itself on GPUs.

    presharded-caches /models/llama-70b-tp8 [--max-model-len 8192 ...]

For vLLM's server, `--env` puts the matching set in place and prints the
shell lines that point vLLM at it (the model as $PRESHARDED_MODEL):

    eval "$(presharded-caches --env /models/llama-70b-tp8)"
    vllm serve "$PRESHARDED_MODEL" --served-model-name llama-70b --load-format fast_sharded_state ...
"""

import argparse
import os
import shlex
import subprocess
import sys
from pathlib import Path

from presharded.errors import UserError, exits_cleanly
from presharded.load_checks import check_checkpoint
from presharded.manifest import write_manifest

ROOT = Path(__file__).resolve().parent.parent


def add_caches(checkpoint: Path, engine_flags: list[str]) -> str:
    """Start vLLM on `checkpoint` and keep what it compiled as a set; its name."""
    from presharded import start_caches

    manifest = check_checkpoint(checkpoint, require_manifest=True)
    name = start_caches.set_name(manifest.tensor_parallel_size, manifest.pipeline_parallel_size)
    with start_caches.workspace_locked(manifest) as workspace:  # loads of this checkpoint here wait for it
        start_caches.empty_workspace(workspace, checkpoint)
        cmd = [sys.executable, str(ROOT / "load_sharded_state.py"), "--model", str(workspace / "model"),
               "--max-tokens", "1", "--no-start-caches", *engine_flags]
        print(f"starting vLLM on {checkpoint} to fill the start-up caches {name}", file=sys.stderr, flush=True)
        proc = subprocess.run(cmd, env={**os.environ, **start_caches.engine_env(workspace)}, stdout=subprocess.DEVNULL)
        if proc.returncode != 0:
            raise UserError(f"vLLM did not start on {checkpoint} (exit {proc.returncode}; its messages are above); "
                            "no start-up caches were added")
        manifest.caches[name] = start_caches.keep(workspace, checkpoint, manifest, name)
    write_manifest(checkpoint, manifest)
    return name


def after_save(checkpoint: Path, save_argv: list[str]) -> str | None:
    """The save's last step: a set made with the engine flags the save was
    given (its own flags left out); a failure is a warning, the checkpoint is
    complete without caches."""
    try:
        return add_caches(checkpoint, serving_flags(save_argv))
    except UserError as e:
        print(f"warning: {e}; the checkpoint is complete without them (add them with presharded-caches)",
              file=sys.stderr)
        return None


def serving_env(checkpoint: Path) -> str:
    """`export` lines for a server started on $PRESHARDED_MODEL: the checkpoint
    through its caches' fixed place, or the checkpoint itself (with a warning) without a set."""
    from presharded import start_caches

    manifest = check_checkpoint(checkpoint, require_manifest=True)
    use = start_caches.prepare(checkpoint, manifest, manifest.tensor_parallel_size, manifest.pipeline_parallel_size)
    env = {**use.env, "PRESHARDED_MODEL": str(use.model.absolute())}
    return "\n".join(f"export {name}={shlex.quote(value)}" for name, value in env.items())


def serving_flags(save_argv: list[str]) -> list[str]:
    """The save's command line less what the load takes from the checkpoint or does not know."""
    parser = argparse.ArgumentParser(add_help=False, allow_abbrev=False)
    for flag in ["--model", "--output", "--max-file-size", "--file-pattern", "--load-format", "--revision",
                 "--tensor-parallel-size", "-tp", "--pipeline-parallel-size", "-pp"]:
        parser.add_argument(flag)
    for flag in ["--replace", "--json", "--start-caches", "--no-start-caches"]:
        parser.add_argument(flag, action="store_true")
    return parser.parse_known_args(save_argv)[1]


@exits_cleanly
def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("checkpoint", type=Path)
    parser.add_argument("--env", action="store_true",
                        help="add nothing: put the matching set in place and print the shell lines to serve from it")
    args, engine_flags = parser.parse_known_args()
    if args.env:
        print(serving_env(args.checkpoint))
        return
    name = add_caches(args.checkpoint, engine_flags)
    entries = check_checkpoint(args.checkpoint, require_manifest=True).caches[name]
    size = sum(e.size for e in entries)
    print(f"{args.checkpoint}: start-up caches {name} ({len(entries)} files, {size / 1e6:.1f} MB)")


if __name__ == "__main__":
    main()
