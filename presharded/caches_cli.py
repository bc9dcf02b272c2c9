"""Add start-up caches to a checkpoint: start vLLM once on it with the engine
flags given (compilation and CUDA graphs on unless told otherwise) and keep
what that start compiled inside the checkpoint, as the set for this kind of
machine and the checkpoint's layout. Later starts of the checkpoint with the
same flags, on a machine of the same kind, use it (a load reports
`caches: hit`). A save does this by itself on GPUs. The work is in
presharded/start_caches.py; this is its command line.

    presharded-caches /models/llama-70b-tp8 [--max-model-len 8192 ...]

A set grows: each run adds what its start compiled. vLLM's server compiles
for other defaults than the load script (fewer batched tokens): `--serve`
starts the server instead. `--env` then puts the matching set in place and
prints the shell lines that point vLLM at it (the model as $PRESHARDED_MODEL):

    presharded-caches --serve /models/llama-70b-tp8 -tp 8
    eval "$(presharded-caches --env /models/llama-70b-tp8)"
    vllm serve "$PRESHARDED_MODEL" --served-model-name llama-70b --load-format fast_sharded_state ...
"""

import argparse
import shlex
from pathlib import Path

from presharded.errors import exits_cleanly
from presharded.load_checks import checked_manifest
from presharded.start_caches import record_set, serving_env
from presharded.env import TRUST_ENV
from presharded.trust import TRUST_FLAG


@exits_cleanly
def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("checkpoint", type=Path)
    parser.add_argument("--serve", action="store_true",
                        help="start vLLM's OpenAI server (what `vllm serve` compiles) instead of an LLM")
    parser.add_argument("--env", action="store_true",
                        help="add nothing: put the matching set in place and print the shell lines to serve from it")
    parser.add_argument(TRUST_FLAG, dest="trust", action="store_true",
                        help=f"use the checkpoint's set though this user did not make it here (or {TRUST_ENV}=1): "
                        "it holds compiled code that will run")
    args, engine_flags = parser.parse_known_args()
    if args.env:
        env = serving_env(args.checkpoint, args.trust)
        print("\n".join(f"export {name}={shlex.quote(value)}" for name, value in env.items()))
        return
    name = record_set(args.checkpoint, engine_flags, serve=args.serve, trust=args.trust)
    entries = checked_manifest(args.checkpoint).caches[name]
    size = sum(e.size for e in entries)
    print(f"{args.checkpoint}: start-up caches {name} ({len(entries)} files, {size / 1e6:.1f} MB)")


if __name__ == "__main__":
    main()
