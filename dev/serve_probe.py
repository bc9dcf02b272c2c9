"""Seconds from launching a server to its first answer, and the answer's greedy tokens:
vLLM's own OpenAI server (`--entry vllm`) or presharded-serve (`--entry serve`, which
restores the checkpoint's server snapshot), on the same checkpoint and flags.

    python dev/serve_probe.py --entry serve --model CKPT --out x.json [vllm serve flags]
"""

import argparse
import json
import os
import sys
import time
from pathlib import Path

from presharded import server
from presharded.formats import FAST_FORMAT

PROMPT = "The capital of France is"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--entry", choices=["vllm", "serve"], required=True)
    parser.add_argument("--model", type=Path, required=True)
    parser.add_argument("--out", type=Path, required=True)
    args, flags = parser.parse_known_args()
    entry = server.VLLM if args.entry == "vllm" else server.SERVE
    flags = [*flags, "--load-format", FAST_FORMAT] if args.entry == "vllm" else flags
    err = args.out.with_suffix(".err")
    start = time.perf_counter()
    with open(err, "w") as log, server.running(args.model, flags, dict(os.environ), 900, log, entry) as (proc, port):
        if port is None:
            sys.exit(f"no server: {err.read_text()[-3000:]}")
        health = time.perf_counter() - start
        body = {"model": str(args.model), "prompt": PROMPT, "max_tokens": 32, "temperature": 0, "return_token_ids": True}
        choice = server.completion(port, body)["choices"][0]
        answered = time.perf_counter() - start
    restored = [line for line in err.read_text().splitlines() if line.startswith(("restored ", "warning:"))]
    result = {"entry": args.entry, "flags": flags, "health_seconds": round(health, 3),
              "first_answer_seconds": round(answered, 3), "text": choice["text"],
              "token_ids": choice.get("token_ids"), "restore": restored}
    args.out.write_text(json.dumps(result, indent=1) + "\n")
    print(json.dumps(result))


if __name__ == "__main__":
    main()
