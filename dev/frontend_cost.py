"""What this package costs a vLLM front end (the process that parses flags
and starts the engine, or vLLM's API server), which loads no model itself.
In fresh processes, after `from vllm import LLM, EngineArgs`, times:

  ours      importing presharded.vllm_compat and running vLLM's plugins (ours included)
  loaders   importing vLLM's model loaders, which ours did in that process
            until they were imported lazily

    python dev/frontend_cost.py [--repeats 3]

Prints one JSON line per process.
"""

import argparse
import json
import subprocess
import sys

PROBE = {
    "ours": "import presharded.vllm_compat\nfrom vllm.plugins import load_general_plugins\nload_general_plugins()",
    "loaders": "import vllm.model_executor.model_loader",
}
TIMED = """
import json, sys, time
from vllm import LLM, EngineArgs
start = time.perf_counter()
{code}
print(json.dumps({{"seconds": round(time.perf_counter() - start, 3),
                  "loaders_imported": "vllm.model_executor.model_loader" in sys.modules}}))
"""


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()
    for repeat in range(args.repeats):
        for what, code in PROBE.items():
            proc = subprocess.run([sys.executable, "-c", TIMED.format(code=code)], capture_output=True, text=True)
            if proc.returncode != 0:
                sys.exit(f"{what} failed:\n{proc.stderr[-2000:]}")
            result = json.loads(proc.stdout.strip().splitlines()[-1])
            print(json.dumps({"what": what, "repeat": repeat, **result}), flush=True)


if __name__ == "__main__":
    main()
