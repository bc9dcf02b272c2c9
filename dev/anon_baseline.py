"""How much anonymous memory (what CRIU dumps) a process holds before any engine starts: after Python,
torch, CUDA's context and a cuBLAS matmul (where there is a GPU), `import vllm` and a model's module
(issue 38: the engine process's 1.4 GB at its dump, against what the imports alone cost). One line per step, in MiB: RssAnon and the
[heap]'s resident part.

    python3 dev/anon_baseline.py
"""

import re
import time


def memory() -> str:
    status = open("/proc/self/status").read()
    anon = int(re.search(r"RssAnon:\s+(\d+)", status).group(1)) / 1024
    heap, smaps = 0.0, open("/proc/self/smaps").read()
    for m in re.finditer(r"\[heap\]\n(?:.*\n)*?Rss:\s+(\d+) kB", smaps):
        heap += int(m.group(1)) / 1024
    return f"anon {anon:7.1f} MiB, heap {heap:7.1f} MiB"


t = time.perf_counter()
print(f"python           {memory()}", flush=True)
import torch  # noqa: E402

print(f"import torch     {memory()}", flush=True)
if torch.cuda.is_available():
    x = torch.ones(1024, 1024, device="cuda")
    print(f"CUDA context     {memory()}", flush=True)
    (x @ x).sum().item()
    print(f"cuBLAS matmul    {memory()}", flush=True)
import vllm  # noqa: E402, F401

print(f"import vllm      {memory()}", flush=True)
from vllm.model_executor.models import llama  # noqa: E402, F401

print(f"vllm's llama     {memory()}  ({time.perf_counter() - t:.1f} s)", flush=True)
