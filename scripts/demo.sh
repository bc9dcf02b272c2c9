#!/usr/bin/env bash
# The main job on a built-in tiny model: build it (offline, deterministic),
# save it pre-sharded for 2 tensor-parallel ranks, load it and generate.
set -euo pipefail
cd "$(dirname "$0")/.."
export VLLM_LOGGING_LEVEL=${VLLM_LOGGING_LEVEL:-WARNING}
.venv/bin/python -m presharded.tiny build/tiny-llama
.venv/bin/python save_sharded_state.py --model build/tiny-llama --output build/tiny-llama-tp2 \
  --tensor-parallel-size 2 --replace
.venv/bin/presharded-inspect build/tiny-llama-tp2
# --enforce-eager: on CPU, compiling the model would take longer than the demo itself.
.venv/bin/python load_sharded_state.py --model build/tiny-llama-tp2 --prompt "The quick brown fox" \
  --max-tokens 24 --enforce-eager
