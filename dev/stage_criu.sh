# Sourced on the GPU machine (bash): CRIU 4.2.1 and NVIDIA's cuda-checkpoint, carried in .whl/criu, put
# in /root/criu/bin and on PATH; io_uring off (CRIU cannot dump it). Used by dev/snapshot_gpu.sh and
# dev/wide_tp.sh.
mkdir -p /root/criu/bin
cp -rn "$(dirname "${BASH_SOURCE[0]}")/../.whl/criu/." /root/criu/ 2>/dev/null || true
printf '#!/bin/sh\nexec env LD_LIBRARY_PATH=/root/criu/lib /root/criu/criu "$@"\n' > /root/criu/bin/criu
ln -sf /root/criu/cuda-checkpoint /root/criu/bin/cuda-checkpoint
chmod +x /root/criu/bin/criu /root/criu/cuda-checkpoint
export PATH=/root/criu/bin:$PATH
echo 2 > /proc/sys/kernel/io_uring_disabled
