"""The process an engine snapshot holds (presharded/snapshot.py starts it and
dumps it): vLLM's engine in this very process, started from the checkpoint
with sleep mode, asleep once it has generated. Restored, it goes on where it
waited: it wakes, reads its weights from the checkpoint with our loader,
answers the one request it finds in its inbox, and exits.

    python -m presharded.snapshot_engine INBOX --model WORKSPACE/ID/model [engine flags]
"""

import os

os.environ.setdefault("VLLM_LOGGING_STREAM", "ext://sys.stderr")

import json
import sys
import time
import traceback
from pathlib import Path

from presharded.engine_defaults import apply_engine_defaults
from presharded.flags import fill_unset, parse_engine_flags
from presharded.formats import FAST_FORMAT
from presharded.load_checks import saved_layout
from presharded.manifest import read_manifest
from presharded.snapshot_sets import sleeps
from presharded.snapshot_inbox import DONE, KEEP, READY, REQUEST, own_session, put, redirect, wait_for
from presharded.snapshot_steps import fall_asleep, run, wake

PROMPT = "The capital of France is"


def start_engine(argv: list[str], sleep: bool):
    """vLLM's engine as a load starts it (the checkpoint's layout where unset), with sleep mode if `sleep`."""
    from vllm import LLM, EngineArgs

    from presharded.snapshot_worker import SNAPSHOT_WORKER

    args, parser = parse_engine_flags(argv, lambda parser: None, __doc__, {"load_format": FAST_FORMAT})
    model = Path(args.model)
    fill_unset(args, parser, saved_layout(model, read_manifest(model)))
    apply_engine_defaults(args, parser, saving=False)
    args.load_format, args.enable_sleep_mode, args.worker_extension_cls = FAST_FORMAT, sleep, SNAPSHOT_WORKER
    return LLM.from_engine_args(EngineArgs.from_cli_args(args))


def generate(llm, prompt: str, max_tokens: int, temperature: float = 0.0, top_p: float = 1.0):
    from vllm import SamplingParams

    params = SamplingParams(max_tokens=max_tokens, temperature=temperature, top_p=top_p)
    return llm.generate([prompt], params, use_tqdm=False)[0].outputs[0]


def answer(llm, request: dict, sleep: bool) -> dict:
    """Restored: wake, refill the weights (if it slept), generate."""
    from presharded.vllm_compat import REQUEST_ERRORS, is_request_error

    seconds = run(wake(request, sleep), llm)
    t = time.perf_counter()
    try:
        output = generate(llm, request["prompt"], request["max_tokens"], request["temperature"], request["top_p"])
    except REQUEST_ERRORS as e:
        return {"error": str(e).splitlines()[0], "request": is_request_error(e)}
    seconds["generate"] = time.perf_counter() - t
    return {"text": output.text, "token_ids": list(output.token_ids), "seconds": seconds}


def main() -> None:
    own_session()
    inbox, argv, sleep = Path(sys.argv[1]), sys.argv[2:], sleeps()
    t = time.perf_counter()
    llm = start_engine(argv, sleep)
    tokens = list(generate(llm, PROMPT, 16).token_ids)
    started = time.perf_counter() - t
    asleep, kept = run(fall_asleep(sleep, json.loads((inbox / KEEP).read_text())), llm)
    redirect(None)
    put(inbox / READY, {"tokens": tokens, "start_seconds": round(started, 3), "asleep_gib": asleep,
                               "kept_bytes": kept})
    request = wait_for(inbox / REQUEST, lambda: True, float("inf"), "the request")  # restored: from here on
    redirect(request["log"])
    try:
        done = answer(llm, request, sleep)
    except Exception as e:  # the script that restored this process reads why, and starts vLLM instead
        traceback.print_exc()
        done = {"error": f"{type(e).__name__}: {e}".splitlines()[0]}
    put(inbox / DONE, done)
    os._exit(0)  # vLLM's shutdown would only take time


if __name__ == "__main__":
    main()
