#!/usr/bin/env bash
# Engine snapshot (issue 25) on the GPU machine, through the product's own commands:
# presharded-snapshot makes it, load_sharded_state.py --snapshot restores it, and the
# greedy tokens are compared with a normal start of the same checkpoint and flags.
# `server` (or `both`): presharded-snapshot --server, then dev/serve_probe.py times vLLM's
# own server (also with --enable-sleep-mode, as the restored one runs) and presharded-serve
# (restored on a new node: page cache, image copy and workspace gone; then again warm) to
# their first answer and compares the tokens.
# After ../shared/gpu/README.md's install, with .whl/criu (stage-criu.sh, plus NVIDIA's
# cuda-checkpoint) carried:
#   bash dev/snapshot_gpu.sh tiny $OUT          # the tiny Llama, TP=1
#   bash dev/snapshot_gpu.sh llama-3-8b $OUT    # the 8B shape, random bf16, TP=1
#   bash dev/snapshot_gpu.sh tiny $OUT server   # the server (`both`: engine and server)
#   bash dev/snapshot_gpu.sh tiny $OUT both 2   # at TP=2 (two GPUs)
#   bash dev/snapshot_gpu.sh tiny $OUT engine 1 --quantization fp8   # further flags: save, snapshot and loads
# Run again with the same OUT, it keeps what an earlier call made there (a save, a snapshot, a normal start).
# A call brings back at most 8 files of $OUT: write elsewhere and tar it there, as in
#   bash dev/snapshot_gpu.sh tiny /root/r/tiny both; tar czf $OUT/tiny.tgz -C /root/r tiny
set -euo pipefail
model=$1 out=$2 mode=${3:-engine} tp=${4:-1} repo=$PWD
shift $(( $# < 4 ? $# : 4 ))
mkdir -p "$out"
source dev/stage_criu.sh
export PYTHONPATH=/root/site VLLM_USE_FLASHINFER_SAMPLER=0 PYTHONUNBUFFERED=1
python3 -m pip install -q --no-deps --no-build-isolation --no-compile --upgrade --target /root/site . 2>&1 | tail -2
{ criu --version; nvidia-smi --query-gpu=name,driver_version --format=csv,noheader; uname -r
  python3 -c "import importlib.metadata as m; print('vllm', m.version('vllm'), 'torch', m.version('torch'))"; } \
  > "$out/system.txt"
cd /root  # as a user would: the package installed, the checkpoint anywhere
flags=("$@")
if [ "$model" = tiny ]; then
  [ -d /root/tiny ] || python3 -m presharded.tiny_models /root/tiny > /dev/null
  flags+=(--gpu-memory-utilization 0.3)
else
  [ -d "/root/$model" ] || python3 -c "from pathlib import Path; from presharded.bench import synthesize; synthesize('$model', Path('/root/$model'))"
fi
ckpt=/root/$model-tp$tp
made() { [ -s "$out/$model-$1.json" ]; }  # done by an earlier call with this OUT (one that ran out of time): kept
if ! made save; then
  rm -rf "$ckpt"
  python3 -m save_sharded_state --model "/root/$model" --output "$ckpt" -tp "$tp" --no-start-caches "${flags[@]}" \
    --json > "$out/$model-save.json"
fi
if [ "$mode" != server ]; then
  made snapshot || python3 -m presharded.snapshot_cli "$ckpt" "${flags[@]}" --json > "$out/$model-snapshot.json"
  load() { python3 -m load_sharded_state --model "$ckpt" --prompt "The capital of France is" --max-tokens 32 --json \
    --load-format fast_sharded_state "${flags[@]}" "$@"; }
  made normal || load > "$out/$model-normal.json" 2> "$out/$model-normal.err"
  sync; echo 3 > /proc/sys/vm/drop_caches; rm -rf /dev/shm/presharded-0   # a new node: cold files, no image copy
  load --snapshot > "$out/$model-restored-cold.json" 2> "$out/$model-restored-cold.err"
  load --snapshot > "$out/$model-restored-warm.json" 2> "$out/$model-restored-warm.err"
fi
if [ "$mode" != engine ]; then
  made server-snapshot ||
    python3 -m presharded.snapshot_cli "$ckpt" --server "${flags[@]}" --json > "$out/$model-server-snapshot.json"
  probe() { python3 "$repo/dev/serve_probe.py" --model "$ckpt" "${flags[@]}" "$@"; }
  made server-vllm || probe --entry vllm --out "$out/$model-server-vllm.json"
  # The restored server runs with sleep mode (vLLM's CuMem allocator): the same server with it, for the tokens.
  made server-vllm-sleep || probe --entry vllm --enable-sleep-mode --out "$out/$model-server-vllm-sleep.json"
  sync; echo 3 > /proc/sys/vm/drop_caches; rm -rf /dev/shm/presharded-0 /tmp/presharded-0   # a new node
  probe --entry serve --trust-snapshot --out "$out/$model-server-restored-cold.json"
  probe --entry serve --out "$out/$model-server-restored-warm.json"
fi
python3 - "$out" "$model" <<'PY'
import json, pathlib, sys
out, model = pathlib.Path(sys.argv[1]), sys.argv[2]
read = lambda name: json.loads((out / f"{model}-{name}.json").read_text())
if (out / f"{model}-normal.json").exists():
    print(f"{model}: snapshot made {read('snapshot')}")
    normal = read("normal")
    print(f"{model}: normal start {normal['seconds']}")
    for run in ("restored-cold", "restored-warm"):
        r = read(run)
        print(f"{model} {run}: used {r['snapshot']['used']}, same tokens {r['token_ids'] == normal['token_ids']}, "
              f"{r['snapshot'].get('seconds')}")
if (out / f"{model}-server-vllm.json").exists():
    vllm = read("server-vllm")
    print(f"{model} vLLM's server: first answer {vllm['first_answer_seconds']} s")
    sleep = read("server-vllm-sleep")
    print(f"{model} vLLM's server with sleep mode: first answer {sleep['first_answer_seconds']} s, same tokens "
          f"{sleep['token_ids'] == vllm['token_ids']}")
    for run in ("restored-cold", "restored-warm"):
        r = read(f"server-{run}")
        print(f"{model} server {run}: first answer {r['first_answer_seconds']} s, same tokens "
              f"{r['token_ids'] == vllm['token_ids']} (with sleep mode: {r['token_ids'] == sleep['token_ids']}), "
              f"{r['restore']}")
PY
