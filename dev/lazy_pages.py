"""load_sharded_state.py with CRIU's lazy pages: the restore leaves the image's anonymous pages out and
`criu lazy-pages` (userfaultfd) fills them, on a fault or in the background, while the restored engine
goes on (the CUDA restore, the wake, the weights). Does a warm start lose CRIU's second this way?

    PYTHONPATH=/root/site python3 dev/lazy_pages.py --model CKPT --snapshot --trust-snapshot --json ...

Everything else as load_sharded_state.py; `seconds.lazy_done` in --json: when the daemon had put the
last page in place, from the restore's start.
"""

import runpy
import shutil
import subprocess
import sys
import threading
import time
from pathlib import Path

from presharded import snapshot_restore
from presharded.processes import ns_pid, tree
from presharded.snapshot_inbox import rpc_folder
from presharded.snapshot_sets import CRIU_FLAGS, NAMESPACE_FLAGS, tool


def lazy_bring_back(image: Path, box: Path, seconds: dict) -> int:
    rpc_folder()
    criu = shutil.which("criu")
    t = time.perf_counter()
    daemon = subprocess.Popen([criu, "lazy-pages", "-D", str(image), "-W", str(box), "-o", "lazy-pages.log"],
                              stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    while not (box / "lazy-pages.socket").exists():
        if daemon.poll() is not None or time.perf_counter() - t > 5:
            daemon.kill()
            sys.exit(f"criu lazy-pages did not listen ({daemon.poll()}); its log: {box / 'lazy-pages.log'}")
        time.sleep(0.001)
    seconds["lazy_listens"] = time.perf_counter() - t

    def finished() -> None:
        code = daemon.wait()
        seconds["lazy_done"] = time.perf_counter() - t
        print(f"lazy-pages: exit code {code}, {seconds['lazy_done']:.3f} s after the restore began",
              file=sys.stderr, flush=True)

    threading.Thread(target=finished, daemon=True).start()
    tool(criu, "restore", "--lazy-pages", "-D", str(image), "-W", str(box), *CRIU_FLAGS, *NAMESPACE_FLAGS,
         "--root", "/", "-d", "--pidfile", str(box / "restored.pid"), "-o", "restore.log", log=box / "restore.log")
    pid = int((box / "restored.pid").read_text())
    seconds["restore"] = time.perf_counter() - t
    if cuda_pids := snapshot_restore.meta_of(image).get("cuda_pids", []):
        t2 = time.perf_counter()
        inside = {ns_pid(each): each for each in tree(pid)}
        for cuda in cuda_pids:
            tool(shutil.which("cuda-checkpoint"), "--toggle", "--pid", str(inside[cuda]))
        seconds["cuda_restore"] = time.perf_counter() - t2
    return pid


def not_restored(*args, **kwargs) -> None:
    sys.exit(f"not restored: {args[-1]}")  # no vLLM start instead: that would take the machine's minutes


if __name__ == "__main__":
    snapshot_restore.bring_back = lazy_bring_back
    snapshot_restore.not_restored = not_restored
    script = Path(__file__).resolve().parent.parent / "load_sharded_state.py"
    sys.argv = [str(script), *sys.argv[1:]]
    runpy.run_path(str(script), run_name="__main__")
