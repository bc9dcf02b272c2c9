"""Load a pre-sharded checkpoint with vLLM and generate from a prompt.

    python load_sharded_state.py --model /models/llama-70b-tp8 --prompt "Hello"
    python load_sharded_state.py --model /models/smolvlm-tp2 --prompt "<image>What is this?" --image photo.png

The checkpoint is checked against its manifest before any engine starts; the
tensor- and pipeline-parallel sizes, dtype and quantization it was saved for
are used unless given. Every vLLM engine flag works; --load-format defaults
to sharded_state (--load-format fast_sharded_state reads the same files faster).
With --snapshot the checkpoint's engine snapshot (presharded-snapshot) is
restored instead of starting vLLM, where it fits this machine.
"""

import os

os.environ.setdefault("VLLM_LOGGING_STREAM", "ext://sys.stderr")  # stdout is for results

import argparse
import sys

from presharded.errors import exits_cleanly
from presharded.load import Load, add_checkpoint_flags


def add_flags(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--prompt", default="The quick brown fox")
    parser.add_argument("--image", help="an image for a vision-language model; --prompt holds its "
                        "placeholder where the model's prompt format puts one (<image> for LLaVA-style models)")
    parser.add_argument("--max-tokens", type=int, default=32, help="at least 1")
    parser.add_argument("--temperature", type=float, default=0.0, help="0 is greedy")
    parser.add_argument("--top-p", type=float, default=1.0, help="in (0, 1]")
    parser.add_argument("--json", action="store_true", help="print the result as one JSON object")
    add_checkpoint_flags(parser)  # --verify-hashes, --no-start-caches, --prefetch, --snapshot, --trust-...


@exits_cleanly
def main() -> None:
    # Checks first: importing vLLM takes seconds, bad input should not wait for it.
    load = Load.check(sys.argv[1:], add_flags, __doc__)  # the checkpoint against its manifest, for this node's ranks
    if output := load.from_snapshot():  # --snapshot: a restored engine instead of a start, if it can be
        return load.report(output)
    from vllm import LLM, EngineArgs, SamplingParams

    args = load.engine_flags()  # every engine flag; those unset as the checkpoint was saved
    if not load.node.is_driver:
        return load.run_workers(EngineArgs.from_cli_args(args))  # this node's workers (--nnodes), until the end
    load.use_start_caches(args)  # what an earlier start compiled, kept in the checkpoint, if trusted
    with load.engine_start():  # a refusal inside the engine ends this script in one line
        llm = LLM.from_engine_args(EngineArgs.from_cli_args(args))
    params = SamplingParams(max_tokens=args.max_tokens, temperature=args.temperature, top_p=args.top_p)
    prompt = {"prompt": args.prompt, "multi_modal_data": {"image": load.image}} if load.image else args.prompt
    with load.request():  # vLLM checks the prompt against the context here
        output = llm.generate([prompt], params, use_tqdm=False)[0].outputs[0]
    load.report(output)


if __name__ == "__main__":
    main()
