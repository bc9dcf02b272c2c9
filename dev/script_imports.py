"""How long load_sharded_state.py takes before its first import of vLLM, and which of our modules it
imports by then, per set of flags: `python -X importtime`, summed up to the first `vllm` line; the
median of five runs.

    python dev/script_imports.py CHECKPOINT
"""

import statistics
import subprocess
import sys

CASES = {"plain": [], "--prefetch": ["--prefetch"], "--snapshot": ["--snapshot"]}


def before_vllm(checkpoint: str, flags: list[str]) -> tuple[float, list[str]]:
    cmd = [sys.executable, "-X", "importtime", "load_sharded_state.py", "--model", checkpoint, "--max-tokens", "1",
           "--enforce-eager", *flags]
    err = subprocess.run(cmd, capture_output=True, text=True, env={"VLLM_ENABLE_V1_MULTIPROCESSING": "0",
                                                                   "PATH": "/usr/bin:/bin"}).stderr
    total, ours = 0, []
    for line in err.splitlines():
        fields = line.removeprefix("import time:").split("|")
        if not line.startswith("import time:") or len(fields) != 3 or not fields[0].strip().isdigit():
            continue
        name = fields[2].strip()
        if name == "vllm" or name.startswith("vllm."):
            break
        total += int(fields[0])
        if name.startswith("presharded."):
            ours.append(name)
    return total / 1e6, ours


if __name__ == "__main__":
    for case, flags in CASES.items():
        runs = [before_vllm(sys.argv[1], flags) for _ in range(5)]
        seconds, ours = statistics.median(r[0] for r in runs), runs[0][1]
        print(f"{case:12} {seconds:.3f} s of imports before vLLM's; {len(ours)} of ours: {' '.join(sorted(ours))}")
