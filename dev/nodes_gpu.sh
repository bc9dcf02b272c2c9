#!/usr/bin/env bash
# Issue 40, part 3: one machine of several GPUs as two nodes (--nnodes 2 over loopback), each node its
# own GPUs (CUDA_VISIBLE_DEVICES) and its own disk (a folder bound to one path in a mount namespace of its
# own, as tests/test_nodes.py does on the CPU). After ../shared/gpu/README.md's install:
#   bash dev/nodes_gpu.sh /root/r/nodes [TP] [SHAPE]    # TP over both nodes (2: one GPU each); SHAPE tiny
# It saves the model across the two nodes (each node's ranks on its own disk), loads it across them, loads
# the two folders gathered into one on one node (all TP GPUs), and `auto` of the source there: the
# greedy tokens of all three. Then a load across the nodes whose node 1 is killed once its workers run:
# node 0's last line, the seconds it took to end, and what is left on the GPUs.
# Everything goes to OUT (tar it: a call brings back 8 files).
set -euo pipefail
out=$1 tp=${2:-2} shape=${3:-tiny} repo=$PWD
mkdir -p "$out"
site=${SITE:-/root/site}  # where the package is installed (and vLLM, on the GPU machine)
export PYTHONPATH=$site VLLM_USE_FLASHINFER_SAMPLER=0 PYTHONUNBUFFERED=1
export NCCL_SOCKET_IFNAME=lo GLOO_SOCKET_IFNAME=lo VLLM_HOST_IP=127.0.0.1  # the two nodes talk over loopback
python3 -m pip install -q --no-deps --no-build-isolation --no-compile --upgrade --target $site . 2>&1 | tail -2
cd /root
per=$(( tp / 2 )) gpus=$(nvidia-smi -L | wc -l)
[ "$gpus" -ge "$tp" ] || { echo "needs $tp GPUs, this machine has $gpus"; exit 1; }
visible() { seq -s, $(( $1 * per )) $(( $1 * per + per - 1 )); }  # node N's GPUs
model=/root/nodes/source-$shape disks=(/root/nodes/disk0 /root/nodes/disk1) mnt=/root/nodes/mnt
mkdir -p "${disks[@]}" $mnt
[ -d $model ] || python3 -c "
from pathlib import Path; from presharded.bench import synthesize; synthesize('$shape', Path('$model'))"
flags=(--gpu-memory-utilization 0.5)
prompt=(--prompt "The capital of France is" --max-tokens 24 --json)

nodes() {  # NAME SCRIPT ARGS...: both nodes of one command, node 1 first (it waits for the driver)
  local name=$1 script=$2; shift 2
  local port=$(( 20000 + RANDOM % 20000 )) pids=()
  for n in 1 0; do
    CUDA_VISIBLE_DEVICES=$(visible $n) unshare -m sh -c 'mount --bind "$0" "$1" && shift && exec "$@"' \
      "${disks[$n]}" $mnt python3 "$repo/$script" "$@" --nnodes 2 --node-rank $n --master-addr 127.0.0.1 \
      --master-port $port > "$out/$name-node$n.out" 2> "$out/$name-node$n.err" &
    pids[$n]=$!
  done
  local rc=0
  for n in 0 1; do wait ${pids[$n]} || rc=$?; done
  echo "$name: exit $rc" | tee -a "$out/summary.txt"
}

ms() { echo $(( ($(date +%s%N) - $1) / 1000000 )); }  # milliseconds since $1 (date +%s%N)
t=$(date +%s%N)
nodes save save_sharded_state.py --model $model --output $mnt/ckpt -tp $tp "${flags[@]}"
echo "save across nodes: $(ms $t) ms" >> "$out/summary.txt"
nodes load load_sharded_state.py --model $mnt/ckpt -tp $tp --load-format fast_sharded_state "${prompt[@]}" "${flags[@]}"
rm -rf /root/nodes/gathered && cp -r ${disks[0]}/ckpt /root/nodes/gathered
cp ${disks[1]}/ckpt/*.safetensors /root/nodes/gathered/
python3 -m presharded.verify_cli /root/nodes/gathered > "$out/verify.txt" 2>&1 || true
python3 "$repo/load_sharded_state.py" --model /root/nodes/gathered -tp $tp --load-format fast_sharded_state \
  "${prompt[@]}" "${flags[@]}" > "$out/one-node.json" 2> "$out/one-node.err" || true
python3 "$repo/load_sharded_state.py" --model $model -tp $tp --load-format auto "${prompt[@]}" "${flags[@]}" \
  > "$out/auto.json" 2> "$out/auto.err" || true

# A node killed while the engine starts: the other ends, in one line, leaving nothing on the GPUs.
port=$(( 20000 + RANDOM % 20000 ))
for n in 1 0; do
  CUDA_VISIBLE_DEVICES=$(visible $n) unshare -m sh -c 'mount --bind "$0" "$1" && shift && exec "$@"' \
    "${disks[$n]}" $mnt python3 "$repo/load_sharded_state.py" --model $mnt/ckpt -tp $tp --max-tokens 200 \
    --load-format fast_sharded_state "${flags[@]}" --nnodes 2 --node-rank $n --master-addr 127.0.0.1 \
    --master-port $port > "$out/die-node$n.out" 2> "$out/die-node$n.err" &
  pid[$n]=$!
done
until [ "$(pgrep -fc 'Worker')" -ge "$tp" ]; do  # every rank's worker runs: the engine is starting
  sleep 0.2; kill -0 ${pid[0]} 2> /dev/null || break
done
sleep 5
kill -9 ${pid[1]}; t=$(date +%s%N)  # node 1's script (unshare and sh exec it: one PID)
rc=0; wait ${pid[0]} || rc=$?
echo "die: node 1's script killed; node 0 exit $rc after $(ms $t) ms; its last line: $(tail -1 "$out/die-node0.err")" \
  >> "$out/summary.txt"
sleep 10
nvidia-smi --query-compute-apps=pid,process_name,used_memory --format=csv > "$out/left-on-gpus.txt"
ps -eo pid,cmd | grep -E "VllmWorker|Worker_TP|load_sharded_state" | grep -v grep > "$out/left-processes.txt" || true

python3 - "$out" <<'PY' | tee -a "$out/summary.txt"
import json, pathlib, sys
out = pathlib.Path(sys.argv[1])
def tokens(name):
    try:
        return json.loads((out / name).read_text().splitlines()[-1])["token_ids"]
    except Exception as e:
        return f"none ({type(e).__name__})"
across, one, auto = tokens("load-node0.out"), tokens("one-node.json"), tokens("auto.json")
print("tokens across nodes == gathered on one node:", across == one, "== auto:", across == auto)
print("across:", across)
PY
echo "left on the GPUs 10 s later:"; cat "$out/left-on-gpus.txt" "$out/left-processes.txt"
