#!/usr/bin/env bash
# Warm restores of an engine snapshot that dev/snapshot_gpu.sh made (issue 25: the warm target),
# on the GPU machine, side by side in one call: the host's transparent huge pages as they are
# (`madvise` there) and `always` alternated (CRIU restores the image's pages into fresh anonymous
# memory: 4 KiB page faults, or 2 MiB ones), CRIU's own restore statistics of each, then one
# restore with CRIU's verbose log, and where the image's pages go (dev/image_sizes.py, with pycriu
# and protobuf carried in .whl/pycriu). The host's setting is put back at the end. With `cold`, each
# restore is on a new node instead (page cache dropped, image copy removed), and no verbose run.
#   bash dev/snapshot_warm.sh /root/llama-3-8b-tp1 /root/r/warm [N] [cold]
set -euo pipefail
ckpt=$1 out=$2 n=${3:-3} cold=${4:-} repo=$PWD
export PATH=/root/criu/bin:$PATH PYTHONPATH=/root/site VLLM_USE_FLASHINFER_SAMPLER=0
mkdir -p "$out"
python3 -m pip install -q --no-deps --target /root/pycriu-site .whl/pycriu/protobuf-*.whl 2>&1 | grep -v WARNING || true
thp=/sys/kernel/mm/transparent_hugepage/enabled
host=$(sed 's/.*\[\(.*\)\].*/\1/' $thp)
trap 'echo "$host" > $thp' EXIT
cd /root
box() { ls -d /tmp/presharded-0/*/snapshot; }
run() {  # name [env...]: one restore, its output and CRIU's statistics kept
  local name=$1; shift
  if [ -n "$cold" ]; then sync; echo 3 > /proc/sys/vm/drop_caches; rm -rf /dev/shm/presharded-0; fi
  env "$@" python3 -m load_sharded_state --model "$ckpt" --prompt "The capital of France is" --max-tokens 32 \
    --json --load-format fast_sharded_state --snapshot > "$out/$name.json" 2> "$out/$name.err"
  cp "$(box)/stats-restore" "$out/$name.stats-restore"
}
run first  # puts the image copy in place if it is not (and seals it)
for i in $(seq "$n"); do
  echo "$host" > $thp; run "thp-$host-$i"
  echo always > $thp; run "thp-always-$i"
done
echo "$host" > $thp
if [ -z "$cold" ]; then
  printf 'verbosity 4\n' > /root/criu-verbose.conf
  run verbose CRIU_CONFIG_FILE=/root/criu-verbose.conf
  cp "$(box)/restore.log" "$out/verbose-restore.log"
fi
image=$(ls -d /dev/shm/presharded-0/snapshot-*)
PYTHONPATH=/root/pycriu-site:$repo/.whl/pycriu python3 "$repo/dev/image_sizes.py" "$image" --top 25 > "$out/image-sizes.txt"
PYTHONPATH=/root/pycriu-site:$repo/.whl/pycriu python3 - "$out" <<'PY'
import json, pathlib, sys
import pycriu
out = pathlib.Path(sys.argv[1])
normal = [json.loads(p.read_text())["token_ids"] for p in out.parent.glob("*-normal.json")]
for run in sorted(out.glob("*.json")):
    r = json.loads(run.read_text())
    with open(run.with_suffix(".stats-restore"), "rb") as f:
        stats = pycriu.images.load(f)["entries"][0]["restore"]
    same = f", same tokens as the normal start: {r['token_ids'] == normal[0]}" if normal else ""
    print(f"{run.stem}: used {r['snapshot']['used']}{same}, {r['snapshot'].get('seconds')}; CRIU: restore "
          f"{stats['restore_time'] / 1e6:.3f} s, {stats.get('pages_restored', 0) * 4096 / 2**30:.2f} GiB of pages")
PY
