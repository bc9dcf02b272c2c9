"""The model's whole state after loading, for one load format: to compare
vLLM's own load (`auto` on the source) with ours (`fast_sharded_state` on
the checkpoint) tensor by tensor, on the GPU matrix's tiny Qwen3-MoE with
`--quantization fp8` (dev/gpu_matrix.py made both folders). One engine per
process (one in-process engine does not give its GPU memory back).

    VLLM_ENABLE_V1_MULTIPROCESSING=0 VLLM_ALLOW_INSECURE_SERIALIZATION=1 PYTHONPATH=. python3 dev/moe_state.py $OUT auto
    ... python3 dev/moe_state.py $OUT fast      # then torch.load both and compare
"""

import sys
from pathlib import Path

import torch
from vllm import LLM, EngineArgs

from presharded.cli import apply_engine_defaults, full_parse
from presharded.verify_tokens import add_flags

RUNS = {"auto": ("/tmp/presharded-matrix/qwen3-moe", "auto"),
        "fast": ("/tmp/presharded-matrix/qwen3-moe-ckpt", "fast_sharded_state")}

out, name = Path(sys.argv[1]), sys.argv[2]
model, load_format = RUNS[name]
args, parser = full_parse(["--model", model, "--load-format", load_format, "--prompts", "[]",
                           "--quantization", "fp8", "--enforce-eager"], add_flags, "")
apply_engine_defaults(args, parser, saving=False)
llm = LLM.from_engine_args(EngineArgs.from_cli_args(args))
state = llm.apply_model(lambda m: {k: v.detach().cpu().clone() for k, v in m.state_dict().items()})[0]
torch.save(state, out / f"{name}.pt")
print(name, len(state), flush=True)
