"""The process tree a server snapshot holds (presharded/snapshot.py starts it
and dumps it): vLLM's OpenAI-compatible server with its engine core in a
child process, started from the checkpoint with sleep mode, asleep once it
has generated, before it binds a port. Restored, it goes on where it waited:
it wakes, reads its weights from the checkpoint with our loader, and serves
on the host and port of the request it finds in its inbox, with the server
flags given then (an API key never goes into the image).

    python -m presharded.snapshot_server INBOX --model WORKSPACE/ID/model [vllm serve flags]
"""

import os

os.environ.setdefault("VLLM_LOGGING_STREAM", "ext://sys.stderr")

import asyncio
import json
import sys
import time
import traceback
from pathlib import Path

from presharded.engine_defaults import apply_engine_defaults
from presharded.formats import FAST_FORMAT
from presharded.load_checks import saved_layout
from presharded.manifest import read_manifest
from presharded.snapshot_sets import sleeps
from presharded.snapshot_inbox import DONE, KEEP, READY, REQUEST, own_session, put, redirect
from presharded.snapshot_steps import fall_asleep, run_async, wake
from presharded.snapshot_engine import PROMPT


def serve_args(argv: list[str], sleep: bool):
    """`vllm serve`'s flags as our load fills them (the checkpoint's layout where unset), with sleep
    mode if `sleep` and the worker methods a restore calls."""
    from presharded.flags import fill_unset
    from presharded.snapshot_worker import SNAPSHOT_WORKER
    from presharded.vllm_compat import serve_parser

    parser = serve_parser()
    args = parser.parse_args(argv)
    model = Path(args.model)
    fill_unset(args, parser, saved_layout(model, read_manifest(model)))
    apply_engine_defaults(args, parser, saving=False)
    args.load_format, args.enable_sleep_mode, args.worker_extension_cls = FAST_FORMAT, sleep, SNAPSHOT_WORKER
    return args


async def first_tokens(engine) -> list[int]:
    from vllm import SamplingParams

    final = None
    async for final in engine.generate(PROMPT, SamplingParams(max_tokens=16, temperature=0.0), "presharded-first"):
        pass
    return list(final.outputs[0].token_ids)


async def request_for(inbox: Path) -> dict:
    """The request a restore writes (the snapshot waits here); read once and removed: it may hold an API key."""
    path = inbox / REQUEST
    while not path.exists():
        await asyncio.sleep(0.005)
    request = json.loads(path.read_text())
    path.unlink()
    return request


async def main_async(inbox: Path, argv: list[str]) -> None:
    from presharded.vllm_compat import bind, engine_client, serve_app

    sleep = sleeps()
    args = serve_args(argv, sleep)
    t = time.perf_counter()
    async with engine_client(args) as engine:
        tokens = await first_tokens(engine)
        started = time.perf_counter() - t
        asleep, kept = await run_async(fall_asleep(sleep, json.loads((inbox / KEEP).read_text())), engine)
        redirect(None)
        put(inbox / READY, {"tokens": tokens, "start_seconds": round(started, 3),
                                   "asleep_gib": asleep, "kept_bytes": kept})
        request = await request_for(inbox)  # restored: from here on
        redirect(request["log"])
        try:
            seconds = await run_async(wake(request, sleep), engine)
            served = serve_args(request["argv"], sleep)
            served.served_model_name = served.served_model_name or [request["name"]]
            listen, sock = bind(served)
        except (Exception, SystemExit) as e:  # the command that restored this tree reads why, starts vLLM instead
            traceback.print_exc()
            put(inbox / DONE, {"error": f"{type(e).__name__}: {e}".splitlines()[0]})
            return
        put(inbox / DONE, {"listen": listen, "seconds": seconds})
        shutdown = await serve_app(engine, listen, sock, served)
    await shutdown


def main() -> None:
    import uvloop

    own_session()
    uvloop.run(main_async(Path(sys.argv[1]), sys.argv[2:]))


if __name__ == "__main__":
    main()
