"""Add an engine snapshot to a checkpoint: start vLLM's engine on it once with
the engine flags given, let it generate and fall asleep (its weights and KV
cache freed), and keep the process, dumped by CRIU with NVIDIA's
cuda-checkpoint, inside the checkpoint as the snapshot for this machine's GPU,
driver, versions and those flags. A load with the same flags restores it
instead of starting vLLM (presharded/snapshot.py says how, and what must match):

    sysctl kernel.io_uring_disabled=2        # once per boot: CRIU cannot dump an io_uring
    presharded-snapshot /models/llama-8b [--max-model-len 8192 ...]
    python load_sharded_state.py --model /models/llama-8b --snapshot [--max-model-len 8192 ...]

With --server, the snapshot is of vLLM's OpenAI-compatible server (any
`vllm serve` flag), which presharded-serve restores. With --upload
s3://bucket/prefix (a new prefix), the checkpoint and its snapshot are then
uploaded there, the manifest last, for nodes with nothing local
(`load_sharded_state.py --model s3://... --snapshot`, `presharded-serve s3://...`). Needs root, `criu` (4.2
or later) and `unshare` on PATH, one node and no pipeline stages, and NVIDIA
GPUs with `cuda-checkpoint` (TP=1 proven there), or the CPU (no sleep mode:
the image keeps the weights).
"""

import argparse
import json
from pathlib import Path

from presharded import s3
from presharded.errors import UserError, exits_cleanly
from presharded.load_checks import verify_checkpoint
from presharded.snapshot import make
from presharded.env import TRUST_ENV
from presharded.trust import TRUST_FLAG


@exits_cleanly
def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("checkpoint", type=Path)
    parser.add_argument(TRUST_FLAG, dest="trust", action="store_true",
                        help=f"start from the checkpoint's start-up caches though this user did not make them "
                        f"here (or {TRUST_ENV}=1)")
    parser.add_argument("--server", action="store_true",
                        help="a snapshot of vLLM's OpenAI-compatible server, for presharded-serve")
    parser.add_argument("--upload", metavar="S3_URL", help="then upload the checkpoint there (an empty prefix)")
    parser.add_argument("--json", action="store_true", help="print the result as one JSON object")
    args, engine_flags = parser.parse_known_args()
    if args.upload:  # before the engine: a prefix that cannot take it is refused at once
        if not s3.is_s3(args.upload):
            raise UserError(f"--upload {args.upload}: give an s3://bucket/prefix URL")
        s3.check_empty(args.upload)
    name, made = make(args.checkpoint, engine_flags, args.trust, args.server)
    if args.upload:
        verify_checkpoint(args.checkpoint)  # every file as its manifest lists it, before anyone else reads it
        s3.upload(args.checkpoint, args.upload)
        made["uploaded"] = args.upload
    if args.json:
        print(json.dumps({"checkpoint": str(args.checkpoint), "snapshot": name, **made}))
    else:
        print(f"{args.checkpoint}: snapshot {name} ({made['image_bytes'] / 2**30:.2f} GiB; "
              f"CUDA checkpoint {made['cuda_checkpoint']:.2f} s, dump {made['dump']:.2f} s)"
              + (f"; uploaded to {args.upload}" if args.upload else ""))


if __name__ == "__main__":
    main()
