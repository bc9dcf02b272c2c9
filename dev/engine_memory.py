"""The engine process's memory as an engine snapshot leaves it, without CRIU or a checkpoint: vLLM's
engine in this process (VLLM_ENABLE_V1_MULTIPROCESSING=0, as presharded/snapshot.py starts it), random
weights (`--load-format dummy`) in a shape of presharded/bench.py, sleep mode; 16 tokens generated, asleep
at level 2, torch's free blocks given back, as presharded/snapshot_engine.py leaves it before the dump;
then its own writable memory written as CRIU would dump it (dev/live_image.py), for dev/heap_contents.py.
What it does not hold that a snapshot's does: cuda-checkpoint's host copy of what the GPU keeps asleep.

With --decode-batches 1,64,256 it first times one decode step at each batch size (64 tokens' time
less one token's, over 63), so a flag that makes the image smaller shows what it costs in serving.

    python3 dev/engine_memory.py OUT [--shape llama-3-8b|llama-3.2-1b|tiny] [--decode-batches B,...] [engine flags]
"""

import os

os.environ["VLLM_ENABLE_V1_MULTIPROCESSING"] = "0"

import json  # noqa: E402
import sys  # noqa: E402
import time  # noqa: E402
from pathlib import Path  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parent))
from live_image import write_image  # noqa: E402


def shape_folder(shape: str) -> Path:
    """The shape's config and a tokenizer, no weights (the tiny Llama: the tests' own model, whole)."""
    from transformers import LlamaConfig

    from presharded.bench import ARCHITECTURES
    from presharded.tiny_models import build_tiny_llama, build_tokenizer

    folder = Path(f"/tmp/presharded-shape-{shape}")
    if shape == "tiny" and not (folder / "config.json").exists():
        build_tiny_llama(folder)
    elif not (folder / "config.json").exists():
        LlamaConfig(**ARCHITECTURES[shape], torch_dtype="bfloat16", bos_token_id=1, eos_token_id=2).save_pretrained(folder)
        build_tokenizer().save_pretrained(folder)
    return folder


def decode_step_ms(llm, batch: int) -> float:
    """One decode step at this batch size: 64 tokens less 1 token (the prefill), over 63 steps; each the
    faster of two runs, so that a size's first run (its kernels' first use) does not count."""
    from vllm import SamplingParams

    prompts = [f"Request {i}: the capital of France is" for i in range(batch)]
    seconds = {}
    for tokens in (1, 64):
        params = SamplingParams(max_tokens=tokens, temperature=0, ignore_eos=True)
        runs = []
        for _ in range(2):
            t = time.perf_counter()
            llm.generate(prompts, params, use_tqdm=False)
            runs.append(time.perf_counter() - t)
        seconds[tokens] = min(runs)
    return (seconds[64] - seconds[1]) / 63 * 1000


def main() -> None:
    import torch
    from vllm import LLM, EngineArgs, SamplingParams

    from presharded.snapshot_worker import resident_gib
    from presharded.vllm_compat import FlexibleArgumentParser

    parser = FlexibleArgumentParser(description=__doc__)
    parser.add_argument("out", type=Path)
    parser.add_argument("--shape", default="llama-3-8b")
    parser.add_argument("--decode-batches", default="", help="e.g. 1,64,256: time a decode step at each")
    parser = EngineArgs.add_cli_args(parser)
    args = parser.parse_args([sys.argv[1], "--model", "unset", *sys.argv[2:]])
    args.model = args.tokenizer = str(shape_folder(args.shape))
    args.load_format, args.enable_sleep_mode = "dummy", torch.cuda.is_available()  # no sleep on a CPU
    t = time.perf_counter()
    llm = LLM.from_engine_args(EngineArgs.from_cli_args(args))
    tokens = llm.generate(["The capital of France is"], SamplingParams(max_tokens=16, temperature=0),
                          use_tqdm=False)[0].outputs[0].token_ids
    started = time.perf_counter() - t
    batches = [int(b) for b in args.decode_batches.split(",") if b]
    step_ms = {b: round(decode_step_ms(llm, b), 2) for b in batches}
    if torch.cuda.is_available():
        llm.sleep(level=2)
        torch.cuda.empty_cache()
    gib = resident_gib()
    written = write_image(os.getpid(), args.out)
    print(json.dumps({"flags": sys.argv[2:], "start_seconds": round(started, 1), "tokens": len(tokens),
                      "decode_step_ms": step_ms,
                      "asleep_gib": {k: round(v, 3) for k, v in gib.items()}, "image_gib": round(written / 2**30, 3)}))
    sys.stdout.flush()
    os._exit(0)


if __name__ == "__main__":
    main()
