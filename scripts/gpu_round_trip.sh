#!/usr/bin/env bash
# Round trip on the GPU machine, after vLLM 0.26 is installed there as
# ../shared/gpu/README.md says. Builds the tiny Llama, saves it pre-sharded at
# TP=$1 (default: every GPU), loads it with vLLM's sharded_state loader and the
# source with auto, and compares greedy tokens. Writes JSON results to $2.
set -euo pipefail
tp=${1:-$(nvidia-smi -L | wc -l)}
results=${2:-/tmp/presharded-gpu-results}
work=/tmp/presharded-gpu
export PYTHONPATH=/root/site${PYTHONPATH:+:$PYTHONPATH} VLLM_USE_FLASHINFER_SAMPLER=0
export VLLM_LOGGING_LEVEL=WARNING
# Installed (not only on the path) so that vLLM's workers find the plugin.
python3 -m pip install -q --no-deps --no-build-isolation --no-compile --target /root/site . 2>&1 | tail -2
mkdir -p "$results" && rm -rf "$work"
python3 -m presharded.tiny "$work/tiny"
python3 -c "import vllm, torch; print('vllm', vllm.__version__, 'torch', torch.__version__, torch.cuda.get_device_name())"
python3 save_sharded_state.py --model "$work/tiny" --output "$work/tp$tp" -tp "$tp" --json | tee "$results/save.json"
python3 load_sharded_state.py --model "$work/tp$tp" --json | tee "$results/sharded_state.json"
python3 load_sharded_state.py --model "$work/tiny" --load-format auto -tp "$tp" --json | tee "$results/auto.json"
python3 - "$results" <<'PY'
import json, sys
r = {n: json.load(open(f"{sys.argv[1]}/{n}.json")) for n in ("sharded_state", "auto")}
same = r["sharded_state"]["token_ids"] == r["auto"]["token_ids"]
print(f"TP={r['auto']['tensor_parallel_size']}: greedy tokens identical: {same}")
sys.exit(0 if same else 1)
PY
