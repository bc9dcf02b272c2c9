#!/usr/bin/env bash
# Issue 27 on the GPU machine: a model of Llama-3-70B's width (hidden 8192, 64 heads, 8 KV heads,
# intermediate 28672, vocab 128256) with LAYERS of its 80 layers, random bf16, made here once, at TP
# (default: every GPU). One phase per call, in this order; the source stays in /root/bench while the
# machine is up, and a phase that saves deletes the checkpoint first (the disk holds the source and one
# checkpoint; `--replace` would hold two). The bench times what save_sharded_state.py saved.
# Each fits a 10-minute call at 40 layers and TP=4 (72.6 GB):
#   bash dev/wide_tp.sh save TP LAYERS $OUT      # the model made, saved: each rank's write speed
#   bash dev/wide_tp.sh warm TP LAYERS $OUT      # warm starts of auto, sharded_state, ours and dummy, 32 greedy
#                                                # tokens compared; then the host's ceilings, every rank at once
#   bash dev/wide_tp.sh cold TP LAYERS $OUT      # cold page cache: sharded_state and ours, against dd
#   bash dev/wide_tp.sh caches TP LAYERS $OUT    # saved again, with its start-up caches (default engine)
#   bash dev/wide_tp.sh fresh TP LAYERS $OUT     # a new node: sharded_state, ours with the caches, each then warm
#   bash dev/wide_tp.sh snapshot TP LAYERS $OUT  # the engine snapshot made and restored (.whl/criu carried)
#   bash dev/wide_tp.sh fp8 TP LAYERS $OUT       # --quantization fp8 saved: ours against auto, 32 tokens, warm
# After ../shared/gpu/README.md's install. Disk: the source and a checkpoint, each 4.2 + 1.71 x LAYERS GB.
set -euo pipefail
phase=$1 tp=${2:-$(nvidia-smi -L | wc -l)} layers=${3:-40} out=${4:-/tmp/wide} repo=$PWD
mkdir -p "$out/$phase"
export PYTHONPATH=/root/site VLLM_USE_FLASHINFER_SAMPLER=0 PYTHONUNBUFFERED=1
python3 -m pip install -q --no-deps --no-build-isolation --no-compile --upgrade --target /root/site . 2>&1 | tail -2
{ nvidia-smi --query-gpu=name,driver_version --format=csv,noheader; df -h /root | tail -1; free -g | head -2
  python3 -c "import importlib.metadata as m; print('vllm', m.version('vllm'), 'torch', m.version('torch'))"; } \
  > "$out/system-$phase.txt"
cd /root  # as a user would: the package installed, the checkpoint anywhere
bench() { python3 -m presharded.bench --synthetic llama-3-70b --layers "$layers" --tp "$tp" --work /root/bench \
  --no-throwaway --repeats 1 "$@"; }
source_model=/root/bench/source-llama-3-70b-$layers-layers
save() { rm -rf "/root/bench/tp$tp"; python3 "$repo/save_sharded_state.py" --model "$source_model" \
  --output "/root/bench/tp$tp" -tp "$tp" --json "$@"; }
case $phase in
  save)
    [ -d "$source_model" ] || python3 -c "from pathlib import Path; from presharded.bench import synthesize; synthesize('llama-3-70b', Path('$source_model'), $layers)"
    save --no-start-caches --enforce-eager > "$out/save/save.json" ;;
  warm)
    bench --no-cold --max-tokens 32 --formats auto,sharded_state,fast_sharded_state,dummy \
      --out "$out/warm" --enforce-eager > "$out/warm/table.md"
    python3 "$repo/dev/host_ceiling.py" "/root/bench/tp$tp" --threads 16 > "$out/warm/ceiling.jsonl" ;;
  cold)
    bench --no-warm --formats sharded_state,fast_sharded_state --out "$out/cold" --enforce-eager \
      > "$out/cold/table.md" ;;
  caches)
    save --start-caches > "$out/caches/save.json" ;;
  fresh)
    bench --fresh --fresh-variants sharded_state,ours-caches --out "$out/fresh" > "$out/fresh/table.md" ;;
  snapshot)
    source "$repo/dev/stage_criu.sh"
    bench --fresh --fresh-variants snapshot --out "$out/snapshot" > "$out/snapshot/table.md" ;;
  fp8)
    save --no-start-caches --quantization fp8 --enforce-eager > "$out/fp8/save.json"
    bench --no-cold --max-tokens 32 --formats auto,fast_sharded_state --out "$out/fp8" --quantization fp8 \
      --enforce-eager > "$out/fp8/table.md" ;;
  *) echo "unknown phase $phase: save, warm, cold, caches, fresh, snapshot or fp8" >&2; exit 1 ;;
esac
