"""What does pinning the loader's staging buffers cost, and what does it slow
down? Each case runs in a fresh process:

  alloc     pin N MiB of staging, then copy it to the GPU, timed apart:
              torch     torch's pinned allocator (cudaHostAlloc), as presharded.reader did until a0c58d8
              huge      an anonymous mapping with transparent huge pages, touched, then
                        pinned with cudaHostRegister
              small     the same with 4 KiB pages (the reader now pins a mapping in place like these)
  init      what vLLM does while the loader pins in the background: allocate a
            Llama-3-8B's GPU parameters (one per tensor), alone and beside each way of pinning

    PYTHONPATH=. python3 dev/pin_cost.py

Needs only torch and a GPU; prints one JSON line per case.
"""

import argparse
import json
import mmap
import subprocess
import sys
import threading
import time

import torch

LAYER_MB = [32, 8, 8, 32, 117, 117, 117]  # q, k, v, o, gate, up, down of a Llama-3-8B layer


def pin(how: str, nbytes: int) -> tuple[torch.Tensor, dict]:
    start, t = time.perf_counter(), {}
    if how == "torch":
        buf = torch.empty(nbytes, dtype=torch.uint8, pin_memory=True)
    else:
        m = mmap.mmap(-1, nbytes)
        if how == "huge":
            m.madvise(mmap.MADV_HUGEPAGE)
        buf = torch.frombuffer(m, dtype=torch.uint8)
        buf.fill_(0)  # fault every page in
        t["touch_s"] = round(time.perf_counter() - start, 3)
        rc = torch.cuda.cudart().cudaHostRegister(buf.data_ptr(), nbytes, 0)
        assert rc == 0, rc
        buf._map = m
    t["pin_s"] = round(time.perf_counter() - start, 3)
    return buf, t


def alloc(how: str, mib: int) -> None:
    torch.empty(1, device="cuda")
    nbytes = mib * 2**20
    buf, t = pin(how, nbytes)
    dest = torch.empty(nbytes, dtype=torch.uint8, device="cuda")
    dest.copy_(buf, non_blocking=True)
    torch.cuda.synchronize()
    start = time.perf_counter()
    for _ in range(8):
        dest.copy_(buf, non_blocking=True)
    torch.cuda.synchronize()
    gbps = 8 * nbytes / (time.perf_counter() - start) / 1e9
    huge = sum(int(line.split()[1]) for line in open("/proc/self/smaps_rollup") if line.startswith("AnonHugePages"))
    print(json.dumps({"case": "alloc", "how": how, "mib": mib, **t, "h2d_gbps": round(gbps, 2), "anon_huge_kib": huge}))


def init(how: str, mib: int) -> None:
    torch.empty(1, device="cuda")
    done = {}
    if how != "none":
        def background() -> None:
            torch.cuda.set_device(0)
            bufs = [pin(how, 64 * 2**20)[0] for _ in range(mib // 64)]
            done["pin_s"] = time.perf_counter() - start
            done["bufs"] = bufs
        thread = threading.Thread(target=background)
    start = time.perf_counter()
    if how != "none":
        thread.start()
    params = [torch.empty(mb * 2**19, dtype=torch.bfloat16, device="cuda") for _ in range(32) for mb in LAYER_MB]
    params.append(torch.empty(1002 * 2**19, dtype=torch.bfloat16, device="cuda"))  # embeddings
    torch.cuda.synchronize()
    init_s = time.perf_counter() - start
    if how != "none":
        thread.join()
    print(json.dumps({"case": "init", "pinning": how, "mib": mib, "init_s": round(init_s, 3),
                      "pin_s": round(done.get("pin_s", 0), 3), "tensors": len(params)}))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--one", nargs=3, metavar=("CASE", "HOW", "MIB"), help="run one case in this process")
    args = parser.parse_args()
    if args.one:
        case, how, mib = args.one
        {"alloc": alloc, "init": init}[case](how, int(mib))
        return
    cases = [("alloc", how, mib) for mib in (512, 2048) for how in ("torch", "huge", "small")]
    cases += [("init", "none", 0)] + [("init", how, mib) for mib in (512, 2048) for how in ("torch", "huge")]
    for _ in range(2):
        for case in cases:
            subprocess.run([sys.executable, __file__, "--one", case[0], case[1], str(case[2])], check=True)


if __name__ == "__main__":
    main()
