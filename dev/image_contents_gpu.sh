#!/usr/bin/env bash
# What the engine snapshot's process memory holds (issue 38), on the GPU machine after
# ../shared/gpu/README.md's install with .whl/criu carried: the 8B shape saved with its start-up caches,
# snapshotted as is and with --enforce-eager (no compiled graphs, no CUDA graphs), each image by mapping
# (dev/image_sizes.py) and its heap by chunk and Python type (dev/heap_contents.py); beside them, what
# the imports and CUDA's context alone hold (dev/anon_baseline.py). `sweep` needs neither CRIU nor a
# checkpoint: the engine with random weights, asleep, its memory written as CRIU would dump it
# (dev/engine_memory.py), as is, compiled without CUDA graphs, eager, and with CUDA graphs for batches
# up to 64 only; each heap by chunk and Python type, and each engine's decode step timed at batches 1 to
# 256 first (what a smaller image would cost in serving).
# `graphs` measures the trade the sweep points to, with real snapshots: the 8B as is and with CUDA
# graphs up to batch 64 only, each snapshotted, restored warm three times in turns (the whole process
# timed from outside), tokens against a normal start; then the host's ceilings for the weights' read
# (dev/host_ceiling.py: pread, the copy to the GPU, and both at once). `decode` runs the sweep's as is and graphs-to-64
# again, for their decode steps.
#   bash dev/image_contents_gpu.sh snapshot OUT     # about 330 s on a fresh machine
#   bash dev/image_contents_gpu.sh sweep OUT        # about 500 s
#   bash dev/image_contents_gpu.sh graphs OUT       # about 400 s on a fresh machine
#   bash dev/image_contents_gpu.sh decode OUT       # about 200 s
# SHAPE picks the saved model of `snapshot` and `graphs` (the 8B by default; llama-3.2-1b is quicker).
set -euo pipefail
phase=$1 out=$2 repo=$PWD
mkdir -p "$out"
source dev/stage_criu.sh
export VLLM_USE_FLASHINFER_SAMPLER=0 PYTHONUNBUFFERED=1 PYTHONPATH=/root/site
python3 -m pip install -q --no-deps --no-build-isolation --no-compile --upgrade --target /root/site . 2>&1 | tail -2
cd /root
flags=(${ENGINE_FLAGS:---gpu-memory-utilization 0.6 --kv-cache-memory-bytes 17179869184})
if [ "$phase" = sweep ] || [ "$phase" = decode ]; then
  variants=("default" "graphs-none --compilation-config {\"cudagraph_mode\":\"NONE\"}" "eager --enforce-eager"
            "graphs-to-64 --compilation-config {\"max_cudagraph_capture_size\":64}")
  [ "$phase" = decode ] && variants=("${variants[0]}" "${variants[3]}")
  for variant in "${variants[@]}"; do
    name=${variant%% *} extra=(); [ "$name" = "$variant" ] || extra=(${variant#* })
    python3 "$repo/dev/engine_memory.py" "/root/memory-$name" --decode-batches 1,32,64,128,256 "${flags[@]}" "${extra[@]}" \
      > "$out/memory-$name.json" 2> "$out/memory-$name.err" || true
    [ "$phase" = decode ] || timeout 100 python3 "$repo/dev/heap_contents.py" "/root/memory-$name" --top 30 > "$out/heap-$name.txt" 2>&1 || true
    rm -rf "/root/memory-$name"
  done
  exit 0
fi
[ "$phase" = snapshot ] && { python3 "$repo/dev/anon_baseline.py" > "$out/baseline.txt" 2>&1 & }
shape=${SHAPE:-llama-3-8b}  # or another of presharded/bench.py's shapes (llama-3.2-1b, tiny)
model=/root/bench/source-$shape ckpt=/root/bench/tp1
[ "$shape" = llama-3-8b ] || ckpt=/root/bench/$shape-tp1
[ -d $model ] || python3 -c "
from pathlib import Path; from presharded.bench import synthesize; synthesize('$shape', Path('$model'))"
[ -f $ckpt/presharded.json ] || python3 "$repo/save_sharded_state.py" --model $model \
  --output $ckpt -tp 1 --start-caches --json "${flags[@]}" > "$out/save.json" 2> "$out/save.err"
if [ "$phase" = graphs ]; then
  graphs64=(--compilation-config '{"max_cudagraph_capture_size":64}')
  prompt=(--prompt "The capital of France is" --max-tokens 16 --json "${flags[@]}")
  python3 "$repo/load_sharded_state.py" --model $ckpt --load-format fast_sharded_state --trust-start-caches \
    "${prompt[@]}" > "$out/normal.json" 2> "$out/normal.err"
  for name in default graphs-to-64; do
    extra=(); [ $name = default ] || extra=("${graphs64[@]}")
    python3 -m presharded.snapshot_cli $ckpt --trust-start-caches --json "${flags[@]}" "${extra[@]}" \
      > "$out/snapshot-$name.json" 2> "$out/snapshot-$name.err"
    python3 "$repo/load_sharded_state.py" --model $ckpt --snapshot --trust-snapshot "${prompt[@]}" "${extra[@]}" \
      > /dev/null 2>&1  # once untimed: the image's copy made, its pages and the weights' cached
  done
  for run in 1 2 3; do
    for name in default graphs-to-64; do
      extra=(); [ $name = default ] || extra=("${graphs64[@]}")
      /usr/bin/time -f %e -o "$out/process-$name-$run.txt" python3 "$repo/load_sharded_state.py" --model $ckpt \
        --snapshot --trust-snapshot "${prompt[@]}" "${extra[@]}" > "$out/warm-$name-$run.json" 2> "$out/warm-$name-$run.err"
    done
  done
  for set in $ckpt/snapshots/vllm-*/; do du -sb "$set"; done > "$out/sets.txt"
  python3 "$repo/dev/host_ceiling.py" $ckpt --threads 16 > "$out/ceiling.jsonl" 2> "$out/ceiling.err" || true
  grep "fast_sharded_state: rank" "$out"/warm-*.err > "$out/weights.txt" || true
  python3 - "$out" <<'PY'
import json, pathlib, sys
out = pathlib.Path(sys.argv[1])
normal = json.loads((out / "normal.json").read_text().splitlines()[-1])["token_ids"]
for name in ("default", "graphs-to-64"):
    made = json.loads((out / f"snapshot-{name}.json").read_text().splitlines()[-1])
    print(name, "made:", {k: v for k, v in made.items() if k not in ("checkpoint", "snapshot")})
    for run in (1, 2, 3):
        w = json.loads((out / f"warm-{name}-{run}.json").read_text().splitlines()[-1])
        total = float((out / f"process-{name}-{run}.txt").read_text().split()[-1])
        print(f"  warm {run}: {total:.2f} s whole process, restored {w['snapshot']['used']}, "
              f"tokens as a normal start {w['token_ids'] == normal}; {w['snapshot']['seconds']}")
PY
  exit 0
fi
python3 -m presharded.snapshot_cli $ckpt --trust-start-caches --json "${flags[@]}" > "$out/snapshot.json" 2> "$out/snapshot.err"
python3 -m presharded.snapshot_cli $ckpt --trust-start-caches --json "${flags[@]}" --enforce-eager \
  > "$out/snapshot-eager.json" 2> "$out/snapshot-eager.err"
wait
for set in $ckpt/snapshots/vllm-*/; do
  name=$(basename "$set")
  python3 "$repo/dev/image_sizes.py" "$set" --top 25 > "$out/sizes-$name.txt" || true
  timeout 150 python3 "$repo/dev/heap_contents.py" "$set" --top 30 > "$out/heap-$name.txt" 2>&1 || true
done
