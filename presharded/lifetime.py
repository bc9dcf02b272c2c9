"""vLLM's engine and workers end with the script that started them: on
Ctrl-C at once, and after kill -9 too (on a GPU they hold its memory
otherwise). A Ctrl-C is never lost, even where Python drops it."""

import os
import select
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Callable

ENV = "PRESHARDED_ENGINE_OF"  # every process under one of our scripts carries the script's pid
_interrupted = threading.Event()
_cleanups: list[Callable[[], None]] = []


def engine_dies_with_this_process() -> None:
    """Call before vLLM starts any process. A small guard process waits for
    this one to end, however it ends, then kills every process that carries
    its mark; Ctrl-C ends them at once, then raises KeyboardInterrupt."""
    os.environ[ENV] = str(os.getpid())
    subprocess.Popen([sys.executable, "-m", "presharded.lifetime", str(os.getpid())], start_new_session=True,
                     stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)

    def interrupt(signum, frame) -> None:
        _interrupted.set()
        end_marked(os.getpid())
        threading.Thread(target=_exit_if_stuck, daemon=True).start()
        raise KeyboardInterrupt

    signal.signal(signal.SIGINT, interrupt)


def on_stuck_interrupt(cleanup: Callable[[], None]) -> None:
    """What to undo if a Ctrl-C is swallowed: while vLLM waits for its engine
    (a zmq poll), the KeyboardInterrupt is lost and the wait goes on for minutes."""
    _cleanups.append(cleanup)


def _exit_if_stuck(grace: float = 3.0) -> None:
    time.sleep(grace)  # the main thread has had its chance to unwind and exit
    for cleanup in _cleanups:
        cleanup()
    print("interrupted", file=sys.stderr, flush=True)
    os._exit(130)


def interrupted() -> bool:
    """Ctrl-C was pressed. Python drops a KeyboardInterrupt raised inside a
    `__del__` (it prints "Exception ignored") and carries on, and vLLM may
    turn one into its own error: ask this before publishing anything."""
    return _interrupted.is_set()


def end_marked(pid: int) -> None:
    """Kill every process that carries `pid`'s mark, but the caller."""
    import psutil

    for proc in psutil.process_iter():
        try:
            if proc.pid != os.getpid() and proc.environ().get(ENV) == str(pid):
                proc.kill()
        except psutil.Error:
            pass


def guard(pid: int) -> None:
    """Wait for process `pid` to end, then end what it started."""
    try:
        fd = os.pidfd_open(pid)
    except ProcessLookupError:
        pass
    else:
        select.select([fd], [], [])
    end_marked(pid)


if __name__ == "__main__":
    guard(int(sys.argv[1]))
