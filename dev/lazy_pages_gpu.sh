#!/usr/bin/env bash
# Warm starts of the 8B shape's engine snapshot, CRIU's usual restore against its lazy pages
# (dev/lazy_pages.py), taking turns, each whole process timed from outside. After
# `bash dev/new_node_gpu.sh prepare OUT` (the same ENGINE_FLAGS), with .whl/criu carried:
#   bash dev/lazy_pages_gpu.sh OUT 3
set -uo pipefail
out=$1 runs=${2:-3} repo=$PWD
source dev/stage_criu.sh
export PYTHONPATH=/root/site VLLM_USE_FLASHINFER_SAMPLER=0 PYTHONUNBUFFERED=1
{ criu check --feature uffd-noncoop; criu check --feature lazy_pages; } > "$out/criu-check.txt" 2>&1
cd /root
args=(--model /root/bench/tp1 --snapshot --trust-snapshot --prompt "The capital of France is" --max-tokens 16 --json
      ${ENGINE_FLAGS:-})
python3 "$repo/load_sharded_state.py" "${args[@]}" > "$out/first.json" 2> "$out/first.err"  # the image copied
for run in $(seq 1 "$runs"); do
  for way in eager lazy; do
    script=$repo/load_sharded_state.py; [ $way = lazy ] && script=$repo/dev/lazy_pages.py
    timeout 40 /usr/bin/time -f %e -o "$out/process-$way-$run.txt" python3 "$script" "${args[@]}" \
      > "$out/$way-$run.json" 2> "$out/$way-$run.err"
    if [ $way = lazy ]; then  # its logs kept; anything a failed try left behind ended
      for log in /tmp/presharded-0/*/snapshot/*.log; do cp "$log" "$out/$way-$run-${log##*/}"; done
      pkill -9 -f presharded.snapshot_engine; pkill -9 -f "criu lazy-pages"; sleep 1
    fi
  done
done
python3 - "$out" "$runs" <<'PY'
import json, pathlib, sys
out, runs = pathlib.Path(sys.argv[1]), int(sys.argv[2])
normal = json.loads((out / "normal.json").read_text())["token_ids"]
for run in range(1, runs + 1):
    for way in ("eager", "lazy"):
        try:
            r = json.loads((out / f"{way}-{run}.json").read_text())
        except (OSError, ValueError):
            print(f"run {run} {way}: no answer ({(out / f'{way}-{run}.err').read_text().strip().splitlines()[-1:]})")
            continue
        took = (out / f"process-{way}-{run}.txt").read_text().split()[-1]
        print(f"run {run} {way}: {took} s, restored {r['snapshot']['used']}, tokens as a normal start "
              f"{r['token_ids'] == normal}; {r['snapshot']['seconds']}")
        print("  ", *[line for line in (out / f"{way}-{run}.err").read_text().splitlines() if line.startswith("lazy-pages:")])
PY
