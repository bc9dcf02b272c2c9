#!/usr/bin/env bash
# Round trip on the GPU machine, after vLLM 0.26 is installed there as
# ../shared/gpu/README.md says. Builds the tiny Llama, saves it pre-sharded at
# TP=$1 (default: every GPU), loads it with vLLM's sharded_state loader and
# with ours, and the source with auto, and compares greedy tokens. Writes JSON
# results to $2. Any further arguments go to every engine, e.g.
#   bash scripts/gpu_round_trip.sh 1 $OUT/fp8 --quantization fp8 --enforce-eager
set -euo pipefail
tp=${1:-$(nvidia-smi -L | wc -l)}
results=${2:-/tmp/presharded-gpu-results}
shift $(( $# < 2 ? $# : 2 ))
work=/tmp/presharded-gpu
export PYTHONPATH=/root/site${PYTHONPATH:+:$PYTHONPATH} VLLM_USE_FLASHINFER_SAMPLER=0
export VLLM_LOGGING_LEVEL=WARNING
# Installed (not only on the path) so that vLLM's workers find the plugin.
python3 -m pip install -q --no-deps --no-build-isolation --no-compile --upgrade --target /root/site . 2>&1 | tail -2
mkdir -p "$results" && rm -rf "$work"
python3 -m presharded.tiny_models "$work/tiny"
python3 -c "import vllm, torch; print('vllm', vllm.__version__, 'torch', torch.__version__, torch.cuda.get_device_name())"
python3 save_sharded_state.py --model "$work/tiny" --output "$work/tp$tp" -tp "$tp" --no-start-caches "$@" --json | tee "$results/save.json"
for format in sharded_state fast_sharded_state; do
  # sharded_state refuses weights that vLLM quantizes while loading (exit 1, one line): recorded, not fatal
  python3 load_sharded_state.py --model "$work/tp$tp" --load-format $format "$@" --json \
    > "$results/$format.json" 2> "$results/$format.err" || tail -1 "$results/$format.err" | tee "$results/$format.refused"
done
python3 load_sharded_state.py --model "$work/tiny" --load-format auto -tp "$tp" "$@" --json | tee "$results/auto.json"
python3 - "$results" <<'PY'
import json, pathlib, sys
results = pathlib.Path(sys.argv[1])
auto = json.loads((results / "auto.json").read_text())
same = True
for fmt in ("sharded_state", "fast_sharded_state"):
    if (results / f"{fmt}.refused").exists():
        print(f"{fmt}: refused: {(results / f'{fmt}.refused').read_text().strip()}")
        continue
    ids = json.loads((results / f"{fmt}.json").read_text())["token_ids"]
    print(f"TP={auto['tensor_parallel_size']} {fmt}: greedy tokens identical to auto: {ids == auto['token_ids']}")
    same &= ids == auto["token_ids"]
sys.exit(0 if same and not (results / "fast_sharded_state.refused").exists() else 1)
PY
