"""Serve a checkpoint with vLLM's OpenAI-compatible server: restored from the
checkpoint's server snapshot (presharded-snapshot --server) when one matches
this machine and these flags, else started as `vllm serve` starts it, with
our fast_sharded_state loader unless --load-format says otherwise:

    presharded-snapshot /models/llama-8b --server [--max-model-len 8192 ...]   # once
    presharded-serve /models/llama-8b [--port 8000 --max-model-len 8192 ...]  # any `vllm serve` flag
    presharded-serve s3://bucket/llama-8b [--port 8000 ...]                  # from S3: docs/s3.md

A restored server binds the host and port given now and takes the server's
own flags as given now (--port, --api-key, --served-model-name, ...); every
other flag must be as when the snapshot was made. An s3:// checkpoint is
checked as a load checks it (its small files fetched, its objects' sizes and
ETags); its server snapshot streams from S3 into memory, or vLLM's server
reads the weights from S3 with our loader.
"""

import argparse
import json
import os
import sys
from pathlib import Path

from presharded import s3
from presharded.errors import UserError, exits_cleanly
from presharded.flags import parse_for_checks
from presharded.formats import FAST_FORMAT
from presharded.load_checks import checked_manifest
from presharded.snapshot_restore import restore_server
from presharded.env import TRUST_SNAPSHOT_ENV
from presharded.trust import TRUST_SNAPSHOT_FLAG


def served_name(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--served-model-name", nargs="+", default=None)


@exits_cleanly
def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter,
                                     allow_abbrev=False)
    parser.add_argument("checkpoint", help="a checkpoint folder, or s3://bucket/prefix")
    parser.add_argument(TRUST_SNAPSHOT_FLAG, dest="trust", action="store_true",
                        help=f"restore the checkpoint's server snapshot though this user did not make it here: "
                        f"it is a whole process that will run (or {TRUST_SNAPSHOT_ENV}=1)")
    args, flags = parser.parse_known_args()
    early = parse_for_checks(["--model", args.checkpoint, *flags], served_name, __doc__)  # a --config file too
    load_format = early.load_format
    ours = [] if load_format else ["--load-format", FAST_FORMAT]
    if s3.is_s3(args.checkpoint):  # the weights stay in S3; vLLM's server gets the small files' local copy
        if load_format not in (None, FAST_FORMAT):
            raise UserError(f"presharded-serve reads s3:// with {FAST_FORMAT}; for vLLM's own {load_format} "
                            f"run `vllm serve {args.checkpoint} --load-format {load_format}` (without our checks)")
        url, model = args.checkpoint, s3.fetch(args.checkpoint)
        manifest = checked_manifest(model, s3_url=url)
        if (served := restore_server(model, manifest, flags, args.trust, s3_url=url)).used:
            sys.exit(served.exit_code)
        ours += ["--model-loader-extra-config", json.dumps({"s3": url})]
        ours += [] if early.served_model_name else ["--served-model-name", url]
    else:
        model = Path(args.checkpoint)
        manifest = checked_manifest(model)
        if (served := restore_server(model, manifest, flags, args.trust)).used:
            sys.exit(served.exit_code)
    cmd = [sys.executable, "-m", "vllm.entrypoints.openai.api_server", "--model", str(model), *ours, *flags]
    sys.stderr.flush()
    os.execv(sys.executable, cmd)


if __name__ == "__main__":
    main()
