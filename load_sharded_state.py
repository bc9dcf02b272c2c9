"""Load a pre-sharded checkpoint with vLLM and generate from a prompt.

    python load_sharded_state.py --model /models/llama-70b-tp8 --prompt "Hello"

The checkpoint is checked against its manifest before any engine starts; the
tensor- and pipeline-parallel sizes, dtype and quantization it was saved for
are used unless given. Every vLLM engine flag works; --load-format defaults
to sharded_state.
"""

import os

os.environ.setdefault("VLLM_LOGGING_STREAM", "ext://sys.stderr")  # stdout is for results

import argparse
import json
import sys
import time
from pathlib import Path

from presharded import prefetch
from presharded.load_checks import check_checkpoint, saved_layout
from presharded.cli import apply_engine_defaults, early_parse, fill_unset, full_parse
from presharded.errors import UserError, engine_refusals, exits_cleanly
from presharded.formats import CHECKPOINT_FORMATS, SHARDED_STATE
from presharded.lifetime import engine_dies_with_this_process, fail
from presharded.nodes import Liveness, Node
from presharded.trust import TRUST_ENV, TRUST_FLAG

def add_flags(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--prompt", default="The quick brown fox")
    parser.add_argument("--max-tokens", type=int, default=32, help="at least 1")
    parser.add_argument("--temperature", type=float, default=0.0, help="0 is greedy")
    parser.add_argument("--top-p", type=float, default=1.0, help="in (0, 1]")
    parser.add_argument("--verify-hashes", action="store_true",
                        help="hash every file against the manifest before loading")
    parser.add_argument("--no-start-caches", dest="start_caches", action="store_false",
                        help="start without the checkpoint's start-up caches (presharded-caches)")
    parser.add_argument(TRUST_FLAG, dest="trust_start_caches", action="store_true",
                        help="use the checkpoint's start-up caches though this user did not make them here: "
                        f"they hold compiled code that will run (or {TRUST_ENV}=1)")
    parser.add_argument("--prefetch", action="store_true",
                        help="read this node's weights into the page cache while vLLM imports")
    parser.add_argument("--json", action="store_true", help="print the result as one JSON object")


def check_sampling(args: argparse.Namespace) -> None:
    try:
        args.prompt.encode()
    except UnicodeEncodeError as e:  # Python keeps bytes that are not UTF-8 as lone surrogates
        byte = ord(args.prompt[e.start]) & 0xFF
        raise UserError(f"--prompt is not UTF-8 text (byte 0x{byte:02x} at character {e.start}); pass UTF-8 text")
    if args.max_tokens < 1:
        raise UserError(f"--max-tokens {args.max_tokens}: generate at least 1 token")
    if args.temperature < 0:
        raise UserError(f"--temperature {args.temperature}: use 0 (greedy) or more")
    if not 0 < args.top_p <= 1:
        raise UserError(f"--top-p {args.top_p}: use a value above 0, at most 1")


@exits_cleanly
def main() -> None:
    t0 = time.perf_counter()
    # Checks first: importing vLLM takes seconds, bad input should not wait for it.
    early = early_parse(sys.argv[1:], add_flags, __doc__)
    if early.model is None:
        raise UserError("--model is required: a checkpoint folder from save_sharded_state.py")
    check_sampling(early)
    load_format = early.load_format or SHARDED_STATE
    node = Node.from_args(early)  # one of several machines (--nnodes): presharded/nodes.py
    nodes = Liveness(node, "the load", fail) if node.count > 1 else None  # a node that dies ends the others
    layout, manifest = {}, None
    if load_format in CHECKPOINT_FORMATS:
        manifest = check_checkpoint(  # of the ranks this node runs
            Path(early.model),
            tensor_parallel_size=early.tensor_parallel_size,
            pipeline_parallel_size=early.pipeline_parallel_size,
            verify_hashes=early.verify_hashes,
            load_format=load_format,
            node=node,
        )
        layout = saved_layout(Path(early.model), manifest)
        if early.prefetch and manifest is not None:  # presharded/prefetch.py
            ranks = node.ranks(manifest.tensor_parallel_size, manifest.pipeline_parallel_size)
            prefetch.start([Path(early.model) / s.path for s in manifest.shards_of(ranks)])
    t_checks = time.perf_counter()

    from vllm import LLM, EngineArgs, SamplingParams

    from presharded import start_caches
    from presharded.vllm_compat import REQUEST_ERRORS, run_workers

    t_import = time.perf_counter()
    args, parser = full_parse(sys.argv[1:], add_flags, __doc__, {"load_format": SHARDED_STATE})
    fill_unset(args, parser, layout)
    apply_engine_defaults(args, parser, saving=False)
    engine_dies_with_this_process()
    if not node.is_driver:  # this node's workers serve the driver's engine until it ends
        with engine_refusals():
            run_workers(EngineArgs.from_cli_args(args), nodes.wait_for_driver)
        print(f"{node}: the driver's engine has ended", file=sys.stderr)
        return
    caches = start_caches.Use("none", Path(args.model), {})
    if args.start_caches and manifest is not None and node.count == 1:  # presharded/start_caches.py
        caches = start_caches.prepare(Path(args.model), manifest, args.tensor_parallel_size,
                                      args.pipeline_parallel_size, args.trust_start_caches)
        start_caches.apply(caches)
        args.model = str(caches.model)
    with engine_refusals():
        llm = LLM.from_engine_args(EngineArgs.from_cli_args(args))
    t_engine = time.perf_counter()

    params = SamplingParams(max_tokens=args.max_tokens, temperature=args.temperature, top_p=args.top_p)
    try:
        output = llm.generate([args.prompt], params, use_tqdm=False)[0].outputs[0]
    except REQUEST_ERRORS as e:  # vLLM checks the prompt against the context here, before generating
        raise UserError(f"{str(e).splitlines()[0]} (--prompt, --max-tokens, --max-model-len)") from None
    t_generate = time.perf_counter()
    if nodes:
        nodes.finish()
    caches.settle()  # whether the start, first request included, compiled anything

    seconds = {
        "checks": round(t_checks - t0, 3),
        "import": round(t_import - t_checks, 3),
        "engine": round(t_engine - t_import, 3),
        "generate": round(t_generate - t_engine, 3),
        "total": round(t_generate - t0, 3),
    }
    if args.json:
        print(json.dumps({
            "text": output.text,
            "token_ids": list(output.token_ids),
            "load_format": args.load_format,
            "tensor_parallel_size": args.tensor_parallel_size,
            "pipeline_parallel_size": args.pipeline_parallel_size,
            "caches": caches.status,
            "seconds": seconds,
        }))
    else:
        print(printable(output.text))
        print(" · ".join(f"{k} {v:.2f} s" for k, v in seconds.items()) + f" · start-up caches: {caches.status}")


def printable(text: str) -> str:
    """The text with control characters escaped (a random model makes plenty)."""
    return "".join(c if c.isprintable() or c in "\n\t" else repr(c)[1:-1] for c in text)


if __name__ == "__main__":
    main()
