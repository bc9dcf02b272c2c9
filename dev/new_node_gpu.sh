#!/usr/bin/env bash
# A new node restored from the engine snapshot, timed as an operator would (issue 38): the page cache
# written back and dropped, the image copy and workspace gone, no page of the image or the weights left
# cached (mincore), `cat` of the image and the rank's weights timed cold, then the same again and the whole
# `load_sharded_state.py --snapshot` process timed from outside; then the same node warm. Two versions of
# the package side by side, runs interleaved: BEFORE (a `git archive` of the older tree, carried in
# .whl/before) and this tree, each from a snapshot it made itself (BEFORE's in a copy of the checkpoint,
# its weights hard links: the same files); with prepare run before .whl/before is carried, both versions restore
# the one set this tree made (what differs is how each restores it). After ../shared/gpu/README.md's install,
# with .whl/criu and .whl/before carried:
#   bash dev/new_node_gpu.sh prepare $OUT      # the 8B shape made, saved with start-up caches, snapshotted
#   bash dev/new_node_gpu.sh compare $OUT 3    # RUNS rounds: before and after, each new node then warm
#   bash dev/new_node_gpu.sh bench $OUT 3      # presharded-bench --fresh --fresh-variants snapshot --repeats 3
#   bash dev/new_node_gpu.sh image-copy $OUT   # the image alone, cold: cat, copy_hashed, O_DIRECT by 4, 8, 16 threads
# SHAPE picks the model (the 8B by default). ENGINE_FLAGS (unquoted words) go to the save, the snapshots and every start, e.g. a share of the GPU so that
# prepare can run beside other work there: "--gpu-memory-utilization 0.45 --kv-cache-memory-bytes 8589934592".
# Each cat and each new-node start also records what the disks read and how long they were busy, every
# 20 ms (dev/disk_timeline.py, /sys/block/*/stat): `timeline-*.json`, summed up at the end of the compare's
# output (before 4fcba30, `disk-*.json` held the totals alone).
# The before tree: git archive COMMIT presharded load_sharded_state.py pyproject.toml README.md \
#   | (mkdir -p .whl/before && tar x -C .whl/before)
set -euo pipefail
phase=$1 out=$2 runs=${3:-3} repo=$PWD
mkdir -p "$out"
source dev/stage_criu.sh
export VLLM_USE_FLASHINFER_SAMPLER=0 PYTHONUNBUFFERED=1
python3 -m pip install -q --no-deps --no-build-isolation --no-compile --upgrade --target /root/site . 2>&1 | tail -2
if [ -d .whl/before ]; then
  python3 -m pip install -q --no-deps --no-build-isolation --no-compile --upgrade --target /root/site-before \
    ./.whl/before 2>&1 | tail -2
fi
export PYTHONPATH=/root/site
shape=${SHAPE:-llama-3-8b}  # or another of presharded/bench.py's shapes (llama-3.2-1b, tiny)
model=/root/bench/source-$shape ckpt=/root/bench/tp1  # where presharded-bench looks
[ "$shape" = llama-3-8b ] || ckpt=/root/bench/$shape-tp1
{ criu --version; nvidia-smi --query-gpu=name,driver_version --format=csv,noheader; uname -r; nproc; free -g | head -2
  cat /sys/kernel/mm/transparent_hugepage/enabled; df -h /root | tail -1
  python3 -c "import importlib.metadata as m; print('vllm', m.version('vllm'), 'torch', m.version('torch'))"; } \
  > "$out/system-$phase.txt"
cd /root  # as a user would: the package installed, the checkpoint anywhere
flags=(${ENGINE_FLAGS:-})
prompt=(--prompt "The capital of France is" --max-tokens 16 --json "${flags[@]}")
case $phase in
  prepare)
    [ -d "$model" ] || python3 -c "from pathlib import Path; from presharded.bench import synthesize; synthesize('$shape', Path('$model'))"
    [ -f "$ckpt/presharded.json" ] || python3 "$repo/save_sharded_state.py" --model "$model" --output "$ckpt" -tp 1 \
      --start-caches --json "${flags[@]}" > "$out/save.json"
    if [ -d "$repo/.whl/before" ] && [ ! -d "$ckpt-before" ]; then  # before any snapshot: the saved checkpoint
      cp -al "$ckpt" "$ckpt-before" && cp --remove-destination "$ckpt/presharded.json" "$ckpt-before/"
    fi
    python3 -m presharded.snapshot_cli "$ckpt" --trust-start-caches --json "${flags[@]}" > "$out/snapshot.json"
    if [ -d "$ckpt-before" ]; then
      PYTHONPATH=/root/site-before:/root/site python3 -m presharded.snapshot_cli "$ckpt-before" \
        --trust-start-caches --json "${flags[@]}" > "$out/snapshot-before.json"
    fi
    for c in "$ckpt" "$ckpt-before"; do  # what each set's page files hold: zeros left, pages by mapping
      if [ -d "$c" ]; then
        python3 "$repo/dev/image_zeros.py" "$c"/snapshots/vllm-*/ > "$out/zeros-${c##*/}.txt"
        PYTHONPATH=$repo python3 "$repo/dev/image_sizes.py" "$c"/snapshots/vllm-*/ --top 25 > "$out/sizes-${c##*/}.txt" || true
      fi
    done
    sync
    python3 "$repo/load_sharded_state.py" --model "$ckpt" --load-format fast_sharded_state --trust-start-caches "${prompt[@]}" \
      > "$out/normal.json" 2> "$out/normal.err" ;;
  compare)
    files_of() {  # the set's files and the rank's weights
      python3 -c "
from pathlib import Path; from presharded.manifest import read_manifest
m = read_manifest(Path('$1'))
print(' '.join(str(Path('$1') / e.path) for s in m.snapshots.values() for e in s),
      ' '.join(str(Path('$1') / s.path) for s in m.shards))"
    }
    files_after=$(files_of "$ckpt") files_before=""
    [ -d "$ckpt-before" ] && files_before=$(files_of "$ckpt-before")
    new_node() {  # written back, dropped, checked; this user's copies and workspace gone
      sync; echo 3 > /proc/sys/vm/drop_caches; rm -rf /dev/shm/presharded-0 /tmp/presharded-0
      python3 -c "
import sys; from pathlib import Path; from presharded.bench import resident_pages
resident, total = resident_pages([Path(p) for p in sys.argv[1:]])
assert resident == 0, f'{resident} of {total} pages still cached'" $files_after $files_before
    }
    versions="after"; [ -d "$repo/.whl/before" ] && versions="before after"
    for run in $(seq 1 "$runs"); do
      for version in $versions; do
        site=/root/site; [ $version = before ] && site=/root/site-before:/root/site
        script=$repo/load_sharded_state.py; [ $version = before ] && script=$repo/.whl/before/load_sharded_state.py
        load=$ckpt files=$files_after
        [ $version = before ] && [ -d "$ckpt-before" ] && load=$ckpt-before files=$files_before
        new_node
        python3 "$repo/dev/disk_timeline.py" "$out/timeline-cat-$version-$run.json" -- \
          /usr/bin/time -f %e -o "$out/cat-$version-$run.txt" cat $files > /dev/null
        new_node
        PYTHONPATH=$site python3 "$repo/dev/disk_timeline.py" "$out/timeline-new-$version-$run.json" -- \
          /usr/bin/time -f %e -o "$out/process-$version-$run.txt" python3 "$script" \
          --model "$load" --snapshot --trust-snapshot "${prompt[@]}" > "$out/$version-$run-new.json" \
          2> "$out/$version-$run-new.err"
        PYTHONPATH=$site /usr/bin/time -f %e -o "$out/process-$version-$run-warm.txt" python3 "$script" --model "$load" \
          --snapshot --trust-snapshot "${prompt[@]}" > "$out/$version-$run-warm.json" 2> "$out/$version-$run-warm.err"
      done
    done
    python3 - "$out" "$runs" $versions <<'PY'
import json, pathlib, sys
out, runs, versions = pathlib.Path(sys.argv[1]), int(sys.argv[2]), sys.argv[3:]
normal = json.loads((out / "normal.json").read_text())["token_ids"]


for run in range(1, runs + 1):
    for version in versions:
        cat = float((out / f"cat-{version}-{run}.txt").read_text().split()[-1])
        new = float((out / f"process-{version}-{run}.txt").read_text().split()[-1])
        warm = float((out / f"process-{version}-{run}-warm.txt").read_text().split()[-1])
        r = json.loads((out / f"{version}-{run}-new.json").read_text())
        w = json.loads((out / f"{version}-{run}-warm.json").read_text())
        print(f"run {run} {version}: cat {cat:.2f} s, new node {new:.2f} s ({new / cat:.2f}x), warm {warm:.2f} s; "
              f"restored {r['snapshot']['used']} {w['snapshot']['used']}, tokens as a normal start "
              f"{r['token_ids'] == normal} {w['token_ids'] == normal}; new {r['snapshot']['seconds']}; "
              f"warm {w['snapshot']['seconds']}")
PY
    python3 "$repo/dev/disk_timeline.py" --summary "$out"/timeline-*.json ;;
  image-copy)  # the image alone, cold: cat against copy_hashed and the O_DIRECT copy (dev/image_copy.py)
    python3 "$repo/dev/image_copy.py" "$ckpt" --threads 4,8,16 --repeats 2 > "$out/image-copy.json" \
      2> "$out/image-copy.err" ;;
  bench)
    python3 -m presharded.bench --synthetic llama-3-8b --tp 1 --fresh --fresh-variants snapshot \
      --repeats "$runs" --work /root/bench --out "$out/bench" > "$out/bench.md" ;;
esac
