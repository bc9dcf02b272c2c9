"""save_sharded_state.py with its refusal of vLLM's save hook on a mixture of experts taken out, to see
what vLLM's hook itself writes for one and whether it loads back (docs/architectures.md's hook column).
Not for checkpoints anyone will use.

    python dev/hook_unchecked.py --model SOURCE --output CKPT --vllm-save-hook [engine flags]
"""

import runpy
import sys
from pathlib import Path

import presharded.save_checks

presharded.save_checks.MOE_KEYS = ()  # the one check taken out; every other stays
sys.argv[0] = str(Path(__file__).resolve().parent.parent / "save_sharded_state.py")
runpy.run_path(sys.argv[0], run_name="__main__")
