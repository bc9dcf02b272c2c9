"""Greedy tokens from vLLM on models or checkpoints, with each load's report,
as JSON: the package's own engine starts, one after another in a process of
their own, for the commands that need them (presharded-verify --source,
presharded-caches, presharded-bench) and for the tests. With --snapshot, the
checkpoint's engine snapshot restored and asked the first prompt, where it can be.
A prompt may be {"prompt": "<image>...", "image": PATH} for a vision-language model,
and a run may have prompts of its own: [MODEL, FORMAT, PROMPTS].

    python -m presharded.generate '[["CKPT", "sharded_state"]]' --prompts '["Hello"]' [engine flags]
"""

import os

os.environ.setdefault("VLLM_LOGGING_STREAM", "ext://sys.stderr")  # stdout is for results

import argparse
import gc
import json
import subprocess
import sys

from presharded.errors import UserError, exits_cleanly
from presharded.load import Load, add_checkpoint_flags, read_image

PROMPTS = ["The quick brown fox", "A pre-sharded checkpoint is", "def fibonacci(n):"]


def add_flags(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--prompts", type=json.loads, default=PROMPTS, help="a JSON list of prompts")
    parser.add_argument("--max-tokens", type=int, default=16)
    add_checkpoint_flags(parser)


@exits_cleanly
def main() -> None:
    runs, flags = json.loads(sys.argv[1]), sys.argv[2:]
    results = []
    for model, load_format, *own in runs:
        its_prompts = ["--prompts", json.dumps(own[0])] if own else []
        load = Load.check(["--model", model, "--load-format", load_format, *flags, *its_prompts], add_flags, __doc__)
        if load.early.snapshot and load.early.prompts and isinstance(load.early.prompts[0], str):  # if it can be
            restored = load.from_snapshot({"prompt": load.early.prompts[0], "max_tokens": load.early.max_tokens,
                                           "temperature": 0.0, "top_p": 1.0})
        else:
            restored = None
        if restored:
            results.append({"token_ids": [restored.token_ids], **load.result()})
            continue
        prompts = [p if isinstance(p, str) else {"prompt": p["prompt"],
                                                 "multi_modal_data": {"image": read_image(p["image"])}}
                   for p in load.early.prompts]  # images read before vLLM is imported
        from vllm import LLM, EngineArgs, SamplingParams

        args = load.engine_flags()
        load.use_start_caches(args)
        with load.engine_start():
            llm = LLM.from_engine_args(EngineArgs.from_cli_args(args))
        with load.request():
            outputs = llm.generate(prompts, SamplingParams(temperature=0.0, max_tokens=args.max_tokens),
                                   use_tqdm=False)
        results.append({"token_ids": [list(o.outputs[0].token_ids) for o in outputs], **load.result()})
        del llm, outputs
        gc.collect()
    print(json.dumps(results))


def greedy_tokens(runs: list[tuple], flags: list[str], prompts: list = PROMPTS,
                  env: dict[str, str] | None = None, timeout: float | None = None) -> list[dict]:
    """Each (model, load format[, its own prompts]) of `runs` started one after another in one new
    process: per run, the greedy tokens of every prompt (`token_ids`) and the load's report.
    On a GPU a second engine in one process can give other tokens: give one run per call there."""
    cmd = [sys.executable, "-m", "presharded.generate", json.dumps([[str(r[0]), *r[1:]] for r in runs]),
           "--prompts", json.dumps(prompts), *flags]
    proc = subprocess.run(cmd, stdout=subprocess.PIPE, text=True, env=env, timeout=timeout)
    if proc.returncode != 0:
        names = ", ".join(f"{r[0]} ({r[1]})" for r in runs)
        raise UserError(f"loading {names} failed (exit {proc.returncode}); see the log above")
    return json.loads(proc.stdout.strip().splitlines()[-1])


if __name__ == "__main__":
    main()
