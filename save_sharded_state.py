"""Save a model as a pre-sharded checkpoint: one set of safetensors files per
tensor-parallel (and pipeline-parallel) rank, each holding that rank's slice
of every weight, plus the config, tokenizer files and a manifest.

    python save_sharded_state.py --model meta-llama/Llama-3.1-70B-Instruct \\
        --tensor-parallel-size 8 --output /models/llama-70b-tp8

Every vLLM engine flag works (--quantization, --dtype, ...). Load the result
with load_sharded_state.py, or with vLLM: --load-format sharded_state.

Needs vLLM and this package installed (`pip install -e .`): installing it
registers with vLLM, through vLLM's plugin entry point, the load format that
saves (`presharded_save`) in every process vLLM starts.
"""

import os

os.environ.setdefault("VLLM_LOGGING_STREAM", "ext://sys.stderr")  # stdout is for results

import sys

from presharded.errors import exits_cleanly
from presharded.formats import SAVE_FORMAT
from presharded.save import Save, add_save_flags
from presharded.save_messages import SAVE_RECORDS


@exits_cleanly
def main() -> None:
    # Checks first: importing vLLM takes seconds, bad input should not wait for it.
    # Our flags (--output, --max-file-size, --file-pattern, --replace, --start-caches, --json) beside vLLM's.
    save = Save.check(sys.argv[1:], add_save_flags, __doc__)  # the source, the output, the file pattern, this node
    with save.output_locked():  # one save to an output at a time; vLLM's engine ends with this script
        from vllm import LLM, EngineArgs

        args = save.engine_flags()  # every engine flag, parsed by vLLM's parser
        with save.staging() as folder:  # the checkpoint appears in --output only once it is complete
            engine_args = EngineArgs.from_cli_args(args)
            if not args.vllm_save_hook:
                # Each worker writes its rank while it loads it, not through vLLM's save hook after loading:
                # by then vLLM has rewritten weights for its kernels (process_weights_after_loading), and
                # what the hook saves does not load back for online quantization, MoE or fp8 scales.
                engine_args.model_loader_extra_config = save.request(engine_args)  # where; the source's format
                engine_args.load_format = SAVE_FORMAT  # our saving loader: it reads the source, then writes
                engine_args.worker_extension_cls = SAVE_RECORDS  # each worker answers what it wrote
            if not save.node.is_driver:
                save.run_workers(engine_args)  # this node's workers (--nnodes), until the driver is done
            else:
                with save.engine_start():  # a refusal inside the engine ends this script in one line
                    llm = LLM.from_engine_args(engine_args)
                if args.vllm_save_hook:  # vLLM's own example: loaded, then each worker saves what it holds
                    with save.hook_save():
                        llm.llm_engine.engine_core.save_sharded_state(
                            path=str(folder), pattern=args.file_pattern, max_size=args.max_file_size)
                    records = save.records_on_disk(llm)
                else:
                    records = llm.collective_rpc("presharded_record")  # every rank's files, on any node
                save.write_manifest(records, llm)  # the config and tokenizer beside them, the manifest last
        if save.wants_start_caches():
            save.add_start_caches()  # vLLM started once on the checkpoint; what it compiled kept in it
    save.upload()  # --output s3://...: every file uploaded, the manifest last
    save.report()


if __name__ == "__main__":
    main()
