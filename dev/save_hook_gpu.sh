#!/usr/bin/env bash
# On the GPU machine, after vLLM 0.26 is installed there (../shared/gpu/README.md): each tiny
# architecture saved both ways (each rank while it loads, the default; and through vLLM's own
# save hook, save_sharded_state.py --vllm-save-hook), each checkpoint loaded back with
# sharded_state and fast_sharded_state, greedy tokens against auto (dev/gpu_matrix.py --hook);
# then the hook's refusals before the engine on this machine (fp8, a mixture of experts).
#   bash dev/save_hook_gpu.sh $OUT [ARCHS]
set -euo pipefail
out=${1:?results folder}
archs=${2:-llama,gemma2}
export PYTHONPATH=/root/site${PYTHONPATH:+:$PYTHONPATH} VLLM_USE_FLASHINFER_SAMPLER=0 VLLM_LOGGING_LEVEL=WARNING
# Installed (not only on the path) so that vLLM's workers find the plugin.
python3 -m pip install -q --no-deps --no-build-isolation --no-compile --upgrade --target /root/site . 2>&1 | tail -2
mkdir -p "$out"
python3 -c "import vllm, torch; print('vllm', vllm.__version__, 'torch', torch.__version__, torch.cuda.get_device_name())" \
  | tee "$out/versions.txt"
python3 dev/gpu_matrix.py --out "$out" --work /tmp/presharded-hook --archs "$archs" --hook --enforce-eager
python3 -m presharded.tiny_models /tmp/presharded-hook/moe --arch qwen3-moe --num-layers 2 > /dev/null
for case in "--model /tmp/presharded-hook/llama --quantization fp8" "--model /tmp/presharded-hook/moe"; do
  # shellcheck disable=SC2086
  python3 save_sharded_state.py $case --output /tmp/presharded-hook/refused --vllm-save-hook 2>&1 | tail -1 \
    | tee -a "$out/hook-refusals.txt" || true
done
