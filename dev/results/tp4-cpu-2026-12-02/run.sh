set -x
cd /work/main
export VLLM_LOGGING_LEVEL=WARNING
.venv/bin/python -m presharded.tiny_models /tmp/tp4/tiny
time .venv/bin/python save_sharded_state.py --model /tmp/tp4/tiny --output /tmp/tp4/ckpt -tp 4 --no-start-caches --replace --json
for f in fast_sharded_state sharded_state; do
  time .venv/bin/python load_sharded_state.py --model /tmp/tp4/ckpt --load-format $f --json > /tmp/tp4/$f.json
done
time .venv/bin/python load_sharded_state.py --model /tmp/tp4/tiny --load-format auto -tp 4 --json > /tmp/tp4/auto.json
