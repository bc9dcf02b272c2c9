"""load_sharded_state.py with CRIU's lazy pages: the restore leaves the image's anonymous pages out and
`criu lazy-pages` (userfaultfd) fills them, on a fault or in the background, while the restored engine
goes on (the CUDA restore, the wake, the weights). Does a warm start lose CRIU's second this way?

    PYTHONPATH=/root/site python3 dev/lazy_pages.py --model CKPT --snapshot --trust-snapshot --json ...

Everything else as load_sharded_state.py: its restore (presharded/snapshot_restore.py's bring_back) runs
as it is, with the daemon started first and `--lazy-pages` on CRIU's command. In --json,
`seconds.lazy_listens`: when the daemon listened; `seconds.lazy_done`: when it had put the last page in
place (if before the report), both from the daemon's start; the second also on stderr.
"""

import runpy
import shutil
import subprocess
import sys
import threading
import time
from pathlib import Path

from presharded import snapshot_restore

usual_bring_back, usual_tool = snapshot_restore.bring_back, snapshot_restore.tool


def lazy_bring_back(image: Path, box: Path, seconds: dict) -> int:
    """The usual restore, a lazy-pages daemon beside it in the same image and work folders."""
    start = time.perf_counter()
    daemon = subprocess.Popen([shutil.which("criu"), "lazy-pages", "-D", str(image), "-W", str(box),
                               "-o", "lazy-pages.log"], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    while not (box / "lazy-pages.socket").exists():
        if daemon.poll() is not None or time.perf_counter() - start > 5:
            daemon.kill()
            sys.exit(f"criu lazy-pages did not listen ({daemon.poll()}); its log: {box / 'lazy-pages.log'}")
        time.sleep(0.001)
    seconds["lazy_listens"] = time.perf_counter() - start

    def finished() -> None:
        code = daemon.wait()
        seconds["lazy_done"] = time.perf_counter() - start
        print(f"lazy-pages: exit code {code}, {seconds['lazy_done']:.3f} s after the restore began",
              file=sys.stderr, flush=True)

    threading.Thread(target=finished, daemon=True).start()
    return usual_bring_back(image, box, seconds)


def lazy_tool(*args: str, log: Path | None = None) -> float:
    """CRIU's restore with --lazy-pages; any other command as it is."""
    if args[1:2] == ("restore",):
        args = (args[0], "restore", "--lazy-pages", *args[2:])
    return usual_tool(*args, log=log)


def not_restored(*args, **kwargs) -> None:
    sys.exit(f"not restored: {args[-1]}")  # no vLLM start instead: that would take the machine's minutes


if __name__ == "__main__":
    snapshot_restore.bring_back, snapshot_restore.tool = lazy_bring_back, lazy_tool
    snapshot_restore.not_restored = not_restored
    script = Path(__file__).resolve().parent.parent / "load_sharded_state.py"
    sys.argv = [str(script), *sys.argv[1:]]
    runpy.run_path(str(script), run_name="__main__")
