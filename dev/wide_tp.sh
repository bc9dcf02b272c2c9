#!/usr/bin/env bash
# Issue 27 on the GPU machine: a model of Llama-3-70B's width (hidden 8192, 64 heads, 8 KV heads,
# intermediate 28672, vocab 128256) with LAYERS of its 80 layers, random bf16, made here once, at TP
# (default: every GPU). One phase per call, in the order; the source stays in /root/bench
# while the machine is up, and each phase that saves deletes the checkpoint first (the disk holds
# the source and one checkpoint; `--replace` would hold two):
#   bash dev/wide_tp.sh bf16 TP LAYERS $OUT      # save (per rank, against dd with as many writers), warm starts of
#                                                # auto, sharded_state, ours and dummy, 32 greedy tokens compared;
#                                                # then the host's ceilings with every rank reading at once
#   bash dev/wide_tp.sh fresh TP LAYERS $OUT     # a new node: sharded_state, ours with its start-up caches
#                                                # (default engine: torch.compile and CUDA graphs), each then warm
#   bash dev/wide_tp.sh fp8 TP LAYERS $OUT       # --quantization fp8: ours against auto, 32 tokens, warm
#   bash dev/wide_tp.sh cold TP LAYERS $OUT      # cold page cache: sharded_state and ours, against dd
#   bash dev/wide_tp.sh snapshot TP LAYERS $OUT  # the engine snapshot made and restored (.whl/criu carried),
#                                                # after `fresh` (it reuses that checkpoint and its caches)
# After ../shared/gpu/README.md's install. Disk: source and checkpoint each 4.2 + 1.71 x LAYERS GB.
set -euo pipefail
phase=$1 tp=${2:-$(nvidia-smi -L | wc -l)} layers=${3:-40} out=${4:-/tmp/wide} repo=$PWD
mkdir -p "$out/$phase"
export PYTHONPATH=/root/site VLLM_USE_FLASHINFER_SAMPLER=0 PYTHONUNBUFFERED=1
python3 -m pip install -q --no-deps --no-build-isolation --no-compile --upgrade --target /root/site . 2>&1 | tail -2
{ nvidia-smi --query-gpu=name,driver_version --format=csv,noheader; df -h /root | tail -1; free -g | head -2
  python3 -c "import importlib.metadata as m; print('vllm', m.version('vllm'), 'torch', m.version('torch'))"
  git -C "$repo" rev-parse --short HEAD 2>/dev/null || true; } > "$out/system-$phase.txt"
cd /root  # as a user would: the package installed, the checkpoint anywhere
bench() { python3 -m presharded.bench --synthetic llama-3-70b --layers "$layers" --tp "$tp" --work /root/bench \
  --no-throwaway --repeats 1 "$@"; }
case $phase in
  bf16)
    rm -rf "/root/bench/tp$tp"
    bench --no-cold --max-tokens 32 --formats auto,sharded_state,fast_sharded_state,dummy --out "$out/bf16" \
      --enforce-eager > "$out/bf16/table.md"
    python3 "$repo/dev/host_ceiling.py" "/root/bench/tp$tp" --threads 16 > "$out/bf16/ceiling.jsonl" ;;
  fresh)
    rm -rf "/root/bench/tp$tp"
    bench --fresh --fresh-variants sharded_state,ours-caches --out "$out/fresh" > "$out/fresh/table.md" ;;
  fp8)
    rm -rf "/root/bench/tp$tp"
    bench --no-cold --max-tokens 32 --formats auto,fast_sharded_state --out "$out/fp8" --quantization fp8 \
      --enforce-eager > "$out/fp8/table.md" ;;
  cold)
    bench --no-warm --no-save --formats sharded_state,fast_sharded_state --out "$out/cold" --enforce-eager \
      > "$out/cold/table.md" ;;
  snapshot)
    export PATH=/root/criu/bin:$PATH
    mkdir -p /root/criu/bin && cp -rn "$repo/.whl/criu/." /root/criu/
    printf '#!/bin/sh\nexec env LD_LIBRARY_PATH=/root/criu/lib /root/criu/criu "$@"\n' > /root/criu/bin/criu
    ln -sf /root/criu/cuda-checkpoint /root/criu/bin/cuda-checkpoint && chmod +x /root/criu/bin/criu /root/criu/cuda-checkpoint
    echo 2 > /proc/sys/kernel/io_uring_disabled
    bench --fresh --no-save --fresh-variants snapshot --out "$out/snapshot" > "$out/snapshot/table.md" ;;
  *) echo "unknown phase $phase: bf16, fresh, fp8, cold or snapshot" >&2; exit 1 ;;
esac
