"""Greedy token ids for a few prompts from one engine, printed as a JSON list.
`presharded-verify --source` runs it in a fresh process per model."""

import os

os.environ.setdefault("VLLM_LOGGING_STREAM", "ext://sys.stderr")

import argparse
import json
import sys

from presharded.cli import apply_engine_defaults, full_parse
from presharded.errors import exits_cleanly


def add_flags(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--prompts", type=json.loads, required=True, help="a JSON list of prompts")
    parser.add_argument("--max-tokens", type=int, default=16)


@exits_cleanly
def main() -> None:
    from vllm import LLM, EngineArgs, SamplingParams

    args, parser = full_parse(sys.argv[1:], add_flags, __doc__)
    apply_engine_defaults(args, parser, saving=False)
    llm = LLM.from_engine_args(EngineArgs.from_cli_args(args))
    outputs = llm.generate(args.prompts, SamplingParams(temperature=0.0, max_tokens=args.max_tokens), use_tqdm=False)
    print(json.dumps([list(o.outputs[0].token_ids) for o in outputs]))


if __name__ == "__main__":
    main()
