#!/usr/bin/env bash
# The main job on a built-in tiny model: build it (offline, deterministic),
# save it pre-sharded for 2 tensor-parallel ranks, load it and generate.
# vLLM's own messages go to build/demo.log; VERBOSE=1 shows them here.
set -euo pipefail
cd "$(dirname "$0")/.."
mkdir -p build
log=build/demo.log
: > "$log"
quiet() {  # run a step with its stderr in the log; on failure show the log's end
  if [ -n "${VERBOSE:-}" ]; then "$@"; return; fi
  "$@" 2>>"$log" || { status=$?; tail -n 20 "$log" >&2; exit $status; }
}
echo "(vLLM's messages: $log)"
quiet .venv/bin/python -m presharded.tiny_models build/tiny-llama >/dev/null
quiet .venv/bin/python save_sharded_state.py --model build/tiny-llama --output build/tiny-llama-tp2 \
  --tensor-parallel-size 2 --replace >/dev/null
.venv/bin/presharded-inspect build/tiny-llama-tp2
echo
echo "The tiny model's weights are random: it says words of its tokenizer in a random order (the same"
echo "on every run); the token ids are what the tests compare with vLLM's own loader."
# --enforce-eager: on CPU, compiling the model would take longer than the demo itself.
quiet .venv/bin/python load_sharded_state.py --model build/tiny-llama-tp2 --prompt "The quick brown fox" \
  --max-tokens 24 --enforce-eager
