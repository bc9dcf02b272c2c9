#!/usr/bin/env bash
# The manifest's checks on a start's critical path (issue 38, warm start), on the GPU machine after
# ../shared/gpu/README.md's install with .whl/criu carried: the 8B shape saved with its start-up caches
# and snapshotted (a manifest of some 700 files; SHAPE below), then, side by side in turns, this tree's package
# against an older one in OLD (made here by `git archive COMMIT presharded load_sharded_state.py | tar x -C OLD`):
# dev/manifest_time.py on the checkpoint, and warm restores whose launching script is each version
# (the restored worker's code is the image's, this tree's), the whole process timed from outside.
#   OLD=old_pkg bash dev/manifest_gpu.sh OUT      # about 330 s on a fresh machine
# SHAPE picks the model (the 8B by default; llama-3.2-1b is quicker, its manifest as long).
set -euo pipefail
out=$1 repo=$PWD old=$PWD/${OLD:?the older package\'s folder}
mkdir -p "$out"
source dev/stage_criu.sh
export VLLM_USE_FLASHINFER_SAMPLER=0 PYTHONUNBUFFERED=1 PYTHONPATH=/root/site
python3 -m pip install -q --no-deps --no-build-isolation --no-compile --upgrade --target /root/site . 2>&1 | tail -2
cd /root
flags=(--gpu-memory-utilization 0.6 --kv-cache-memory-bytes 17179869184)
shape=${SHAPE:-llama-3-8b} ckpt=/root/bench/tp1
model=/root/bench/source-$shape
[ "$shape" = llama-3-8b ] || ckpt=/root/bench/$shape-tp1
[ -d $model ] || python3 -c "
from pathlib import Path; from presharded.bench import synthesize; synthesize('$shape', Path('$model'))"
[ -f $ckpt/presharded.json ] || python3 "$repo/save_sharded_state.py" --model $model \
  --output $ckpt -tp 1 --start-caches --json "${flags[@]}" > "$out/save.json" 2> "$out/save.err"
python3 -m presharded.snapshot_cli $ckpt --trust-start-caches --json "${flags[@]}" > "$out/snapshot.json" 2> "$out/snapshot.err"
for run in 1 2; do
  for v in old new; do
    dir=$repo; [ $v = old ] && dir=$old
    PYTHONPATH=$dir:/root/site python3 "$repo/dev/manifest_time.py" $ckpt --runs 5 >> "$out/manifest-$v.jsonl"
  done
done
prompt=(--prompt "The capital of France is" --max-tokens 16 --json "${flags[@]}")
python3 "$repo/load_sharded_state.py" --model $ckpt --snapshot "${prompt[@]}" > /dev/null 2>&1  # untimed: the image's copy
for run in 1 2 3 4; do
  for v in old new; do
    dir=$repo; [ $v = old ] && dir=$old
    /usr/bin/time -f %e -o "$out/process-$v-$run.txt" python3 "$dir/load_sharded_state.py" --model $ckpt --snapshot \
      "${prompt[@]}" > "$out/warm-$v-$run.json" 2> "$out/warm-$v-$run.err"
  done
done
python3 - "$out" $ckpt <<'PY'
import json, pathlib, sys
out, ckpt = pathlib.Path(sys.argv[1]), pathlib.Path(sys.argv[2])
made = json.loads((out / "snapshot.json").read_text().splitlines()[-1])
tokens = json.loads((ckpt / "snapshots" / made["snapshot"] / "snapshot.json").read_text())["tokens"]
print("snapshot:", made["snapshot"], made["image_bytes"], "bytes")
for v in ("old", "new"):
    print(v, "manifest:", (out / f"manifest-{v}.jsonl").read_text().strip().replace("\n", " | "))
for run in (1, 2, 3, 4):
    for v in ("old", "new"):
        w = json.loads((out / f"warm-{v}-{run}.json").read_text().splitlines()[-1])
        total = float((out / f"process-{v}-{run}.txt").read_text().split()[-1])
        print(f"{v} {run}: {total:.2f} s whole process, restored {w['snapshot']['used']}, tokens as the "
              f"snapshot's engine made them before its dump {w['token_ids'] == tokens}; {w['snapshot']['seconds']}")
PY
