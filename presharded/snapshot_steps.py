"""What a snapshotted engine does around its dump, once, for both of vLLM's
engine APIs: `LLM` (presharded/snapshot_engine.py) and the server's async
engine client (presharded/snapshot_server.py). Each sequence is a generator
of the engine calls it makes, `(method, args, kwargs)`, sent each result;
`run` and `run_async` make the calls."""

import time
from collections.abc import Generator

from presharded.snapshot_inbox import ASLEEP, KEEP_WEIGHTS, REFILL, RESTORED

Steps = Generator[tuple[str, tuple, dict], object, object]


def fall_asleep(sleep: bool, keep: dict) -> Steps:
    """The weights and the KV cache freed (if `sleep`: what the checkpoint cannot give back is kept
    first, as `keep` says), and every GPU block not in use given back: what is left on the GPU goes
    into the image. Returns each worker's memory then (presharded_asleep), and the bytes kept."""
    kept = 0
    if sleep:
        kept = sum((yield "collective_rpc", (KEEP_WEIGHTS,), {"args": (keep["folder"], keep["kept_as"])}))
        yield "sleep", (), {"level": 2}
    asleep = yield "collective_rpc", (ASLEEP,), {}
    return asleep, kept


def wake(request: dict, sleep: bool) -> Steps:
    """Restored: the output to the request's log; if it slept, awake and its weights refilled from the
    checkpoint (in S3 where the request says so). Returns the seconds of each."""
    seconds = {}
    yield "collective_rpc", (RESTORED,), {"args": (request["log"], sleep, request.get("s3"))}
    if sleep:
        t = time.perf_counter()
        yield "wake_up", (), {}
        seconds["wake"] = time.perf_counter() - t
        t = time.perf_counter()
        yield "collective_rpc", (REFILL,), {}
        seconds["weights"] = time.perf_counter() - t
    return seconds


def run(steps: Steps, engine):
    """`steps` made on an `LLM`; what they return."""
    result = None
    try:
        while True:
            method, args, kwargs = steps.send(result)
            result = getattr(engine, method)(*args, **kwargs)
    except StopIteration as done:
        return done.value


async def run_async(steps: Steps, engine):
    """`steps` made on the server's engine client; what they return."""
    result = None
    try:
        while True:
            method, args, kwargs = steps.send(result)
            result = await getattr(engine, method)(*args, **kwargs)
    except StopIteration as done:
        return done.value
