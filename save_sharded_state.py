"""Save a model as a pre-sharded checkpoint: one set of safetensors files per
tensor-parallel (and pipeline-parallel) rank, each holding that rank's slice
of every weight, plus the config, tokenizer files and a manifest.

    python save_sharded_state.py --model meta-llama/Llama-3.1-70B-Instruct \\
        --tensor-parallel-size 8 --output /models/llama-70b-tp8

Every vLLM engine flag works (--quantization, --dtype, ...). Load the result
with load_sharded_state.py, or with vLLM: --load-format sharded_state.
"""

import os

os.environ.setdefault("VLLM_LOGGING_STREAM", "ext://sys.stderr")  # stdout is for results

import sys

from presharded.engine_output import engine_refusals
from presharded.errors import exits_cleanly
from presharded.flags import parse_engine_flags
from presharded.save import Save, add_save_flags


@exits_cleanly
def main() -> None:
    # Checks first: importing vLLM takes seconds, bad input should not wait for it.
    # Our flags (--output, --max-file-size, --file-pattern, --replace, --start-caches, --json) beside vLLM's.
    save = Save(sys.argv[1:], add_save_flags, __doc__)  # the source, the output, the file pattern, this node
    with save.output_locked():  # one save to an output at a time; vLLM's engine ends with this script
        from vllm import LLM

        args, parser = parse_engine_flags(sys.argv[1:], add_save_flags, __doc__)
        with save.staging():  # the checkpoint appears in --output only once it is complete
            engine_args = save.engine_args(args, parser)  # the source loaded as asked, by our saving loader
            if save.node.is_driver:
                with engine_refusals():  # a refusal inside the engine ends this script in one line
                    llm = LLM.from_engine_args(engine_args)  # each worker writes its rank as it loads it
                save.write_manifest(llm)  # what every rank wrote, the config and tokenizer, their hashes
            else:
                save.run_workers(engine_args)  # this node's workers (--nnodes), until the driver is done
        if save.wants_start_caches():
            save.add_start_caches()  # vLLM started once on the checkpoint; what it compiled kept in it
    save.upload()  # --output s3://...: every file uploaded, the manifest last
    save.report()


if __name__ == "__main__":
    main()
