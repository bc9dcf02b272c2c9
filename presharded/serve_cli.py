"""Serve a checkpoint with vLLM's OpenAI-compatible server: restored from the
checkpoint's server snapshot (presharded-snapshot --server) when one matches
this machine and these flags, else started as `vllm serve` starts it, with
our fast_sharded_state loader unless --load-format says otherwise:

    presharded-snapshot /models/llama-8b --server [--max-model-len 8192 ...]   # once
    presharded-serve /models/llama-8b [--port 8000 --max-model-len 8192 ...]  # any `vllm serve` flag

A restored server binds the host and port given now and takes the server's
own flags as given now (--port, --api-key, --served-model-name, ...); every
other flag must be as when the snapshot was made.
"""

import argparse
import os
import sys
from pathlib import Path

from presharded.errors import exits_cleanly
from presharded.formats import FAST_FORMAT
from presharded.load_checks import check_checkpoint
from presharded.snapshot_restore import serve
from presharded.trust import TRUST_SNAPSHOT_ENV, TRUST_SNAPSHOT_FLAG


@exits_cleanly
def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter,
                                     allow_abbrev=False)
    parser.add_argument("checkpoint", type=Path)
    parser.add_argument(TRUST_SNAPSHOT_FLAG, dest="trust", action="store_true",
                        help=f"restore the checkpoint's server snapshot though this user did not make it here: "
                        f"it is a whole process that will run (or {TRUST_SNAPSHOT_ENV}=1)")
    args, flags = parser.parse_known_args()
    manifest = check_checkpoint(args.checkpoint, require_manifest=True)
    if (code := serve(args.checkpoint, manifest, flags, args.trust)) is not None:
        sys.exit(code)
    load_format = [] if any(f.split("=")[0] in ("--load-format", "--load_format") for f in flags) else [
        "--load-format", FAST_FORMAT]
    cmd = [sys.executable, "-m", "vllm.entrypoints.openai.api_server", "--model", str(args.checkpoint),
           *load_format, *flags]
    sys.stderr.flush()
    os.execv(sys.executable, cmd)


if __name__ == "__main__":
    main()
