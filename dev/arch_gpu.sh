#!/usr/bin/env bash
# Issue 39's GPU cells on one GPU (vLLM 0.26): dev/gpu_matrix.py for each architecture in bf16 with an engine
# snapshot, and with --quantization fp8; then fp8 with an fp8 KV cache (the attention's q/k/v/prob scales
# that vLLM issue 41174 finds aliased). Side by side, one process per cell, each engine eager with a small
# share of the GPU and its KV cache given (no engine's memory profile then sees another's).
# AGAIN_ARCHS in fp8 with `auto` started three times (does it vary from one engine to the next?).
# After ../shared/gpu/README.md's install, .whl/criu carried:
#   bash dev/arch_gpu.sh $OUT deepseek-v2,granite-hybrid,gemma3,idefics3 llama,deepseek-v2 [AGAIN_ARCHS]
set -euo pipefail
out=$1 archs=$2 kv_archs=${3:-} again_archs=${4:-}
mkdir -p "$out"
source dev/stage_criu.sh
export PYTHONPATH=/root/site:. VLLM_USE_FLASHINFER_SAMPLER=0 PYTHONUNBUFFERED=1 VLLM_LOGGING_LEVEL=WARNING
share=(--enforce-eager --gpu-memory-utilization 0.08 --kv-cache-memory-bytes 1073741824)
cell() {  # NAME, then gpu_matrix's flags
  local name=$1; shift
  python3 dev/gpu_matrix.py --out "$out/$name" --work "/tmp/arch-gpu/$name" "$@" "${share[@]}" > "$out/$name.log" 2>&1
}
for arch in ${archs//,/ }; do
  cell "bf16-$arch" --archs "$arch" --snapshot &
  cell "fp8-$arch" --archs "$arch" --quantization fp8 &
done
[ -n "$kv_archs" ] && cell fp8-kv --archs "$kv_archs" --quantization fp8 --kv-cache-dtype fp8 &
[ -n "$again_archs" ] && cell fp8-again --archs "$again_archs" --quantization fp8 --auto-runs 3 &
wait
for name in "$out"/*/; do cp /tmp/arch-gpu/"$(basename "$name")"/*.err "$name" 2>/dev/null || true; done  # failures' messages
{ nvidia-smi --query-gpu=name,driver_version --format=csv,noheader
  python3 -c "import importlib.metadata as m; print('vllm', m.version('vllm'), 'torch', m.version('torch'))"; } \
  > "$out/system.txt"
for f in "$out"/*/matrix.jsonl; do echo "${f%/matrix.jsonl}"; cat "$f"; done
