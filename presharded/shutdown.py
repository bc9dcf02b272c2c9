"""vLLM's engine and workers end with the script that started them: on
Ctrl-C at once, and after kill -9 too (on a GPU they hold its memory
otherwise). A Ctrl-C is never lost, even where Python drops it. Another
thread can end the script the same way with an `error:` line (`fail`): a
node of several that stopped answering, say."""

import os
import select
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from pathlib import Path

ENV = "PRESHARDED_ENGINE_OF"  # every process under one of our scripts carries the script's pid
REFUSAL_ENV = "PRESHARDED_REFUSAL"  # where code inside vLLM's engine writes why it refused (presharded/errors.py)
_interrupted = threading.Event()
_cleanups: list[Callable[[], None]] = []
_first_on_interrupt: list[Callable[[], None]] = []
_failure: list[str] = []  # why another thread ended the script
_failed = threading.Event()
_watched: list[float] = []  # a watcher may yet call `fail`: how long to wait for its word
_ending = threading.Event()  # the main thread is ending the script: signal it no more
_guard: list[int] = []
_shared_before: set[str] = set()  # /dev/shm before the engine: what it leaves there is told apart
SHARED = Path("/dev/shm")


def engine_dies_with_this_process() -> None:
    """Call before vLLM starts any process. A small guard process waits for
    this one to end, however it ends, then kills every process it started;
    Ctrl-C ends them at once, then raises KeyboardInterrupt."""
    if os.environ.get(ENV) == str(os.getpid()):
        return  # already: one guard is enough
    os.environ[ENV] = str(os.getpid())
    _shared_before.update(os.listdir(SHARED) if SHARED.is_dir() else ())
    guard = subprocess.Popen([sys.executable, "-m", "presharded.shutdown", str(os.getpid())], start_new_session=True,
                             stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    _guard.append(guard.pid)

    def interrupt(signum, frame) -> None:
        _interrupted.set()
        for tell in _first_on_interrupt:
            tell()
        end_started(os.getpid(), spare=_guard)
        threading.Thread(target=_exit_if_stuck, daemon=True).start()
        raise KeyboardInterrupt

    signal.signal(signal.SIGINT, interrupt)


def end_engine(timeout: float = 5.0) -> None:
    """Before a failing script's last line: every process its engine started killed and waited for,
    so that nothing they still write comes after that line; then the shared memory they made in
    /dev/shm (vLLM's queues and buffers, psm_* and vllm*) that no process maps any more, removed."""
    if os.environ.get(ENV) != str(os.getpid()):
        return  # no engine was started
    import psutil

    procs = [p for p in [*descendants(os.getpid()), *marked(os.getpid())] if p.pid not in _guard]
    end(procs)
    psutil.wait_procs(procs, timeout=timeout)
    left = [SHARED / name for name in set(os.listdir(SHARED)) - _shared_before if name.startswith(("psm_", "vllm"))]
    mapped = mapped_inodes()
    for path in left:
        try:
            st = path.lstat()
            if st.st_uid == os.getuid() and st.st_ino not in mapped:
                path.unlink()
        except OSError:
            continue


def mapped_inodes(pids: list[int] | None = None) -> set[int]:
    """The inodes of the files in /dev/shm that the processes `pids` (all, by default) map."""
    inodes = set()
    for pid in pids if pids is not None else [int(p) for p in os.listdir("/proc") if p.isdigit()]:
        try:
            maps = Path(f"/proc/{pid}/maps").read_text().splitlines()
        except OSError:
            continue
        inodes |= {int(line.split()[4]) for line in maps if f" {SHARED}/" in line}
    return inodes


def fail(reason: str) -> None:
    """From any thread: end the engine and the script as Ctrl-C does, but with
    `error: reason` and exit 1 (presharded/errors.py prints it)."""
    if _failure or _interrupted.is_set():  # the first word stands; after a Ctrl-C, the user's
        return
    _failure.append(reason)
    if path := os.environ.get(REFUSAL_ENV):  # the engine's last words go to its log, not the terminal
        try:
            with open(path, "a") as f:
                f.write(f"{reason}\n")
        except OSError:
            pass
    _failed.set()
    if not _ending.is_set():
        signal.pthread_kill(threading.main_thread().ident, signal.SIGINT)


def watched_by(seconds: float) -> None:
    """A watcher that may call `fail` runs: when the engine fails first (vLLM sees a
    dead peer's sockets close before we do), wait this long for its word (`failure`)."""
    _watched.append(seconds)


def watched() -> bool:
    return bool(_watched)


def failure(wait: bool = False) -> str | None:
    """Why another thread ended the script, if it did; with `wait`, the main thread
    is ending the script and waits for a watcher's word first."""
    if wait:
        _ending.set()
        if _watched and not _interrupted.is_set():
            _failed.wait(max(_watched))
    return _failure[0] if _failure else None


def first_on_interrupt(tell: Callable[[], None]) -> None:
    """What a Ctrl-C does before it ends the engine: other nodes hear of it from
    us before their engines see this one's sockets close (and print tracebacks)."""
    _first_on_interrupt.append(tell)


def on_stuck_interrupt(cleanup: Callable[[], None]) -> None:
    """What to undo if a Ctrl-C is swallowed: while vLLM waits for its engine
    (a zmq poll), the KeyboardInterrupt is lost and the wait goes on for minutes."""
    _cleanups.append(cleanup)


def _exit_if_stuck(grace: float = 3.0) -> None:
    time.sleep(grace)  # the main thread has had its chance to unwind and exit
    for cleanup in _cleanups:
        cleanup()
    end_engine()
    print(f"error: {failure()}" if failure() else "interrupted", file=sys.stderr, flush=True)
    os._exit(1 if failure() else 130)


def interrupted() -> bool:
    """Ctrl-C was pressed. Python drops a KeyboardInterrupt raised inside a
    `__del__` (it prints "Exception ignored") and carries on, and vLLM may
    turn one into its own error: ask this before publishing anything."""
    return _interrupted.is_set()


def end_started(pid: int, spare: list[int] = ()) -> None:
    """Kill every process `pid` started (forked ones too) and every process that carries its mark, but `spare`."""
    end([*descendants(pid), *marked(pid)], spare)


def descendants(pid: int) -> list:
    import psutil

    try:
        return psutil.Process(pid).children(recursive=True)
    except psutil.Error:
        return []


def marked(pid: int) -> list:
    """Processes whose environment, as they were started, carries `pid`'s mark
    (a forked process shows its parent's first environment: see `guard`)."""
    import psutil

    found = []
    for proc in psutil.process_iter():
        try:
            if proc.environ().get(ENV) == str(pid):
                found.append(proc)
        except psutil.Error:
            pass
    return found


def end(procs: list, spare: list[int] = ()) -> None:
    import psutil

    for proc in procs:
        try:
            if proc.pid != os.getpid() and proc.pid not in spare:
                proc.kill()  # psutil checks that the pid is still this process, not a new one
        except psutil.Error:
            pass


def guard(pid: int, every: float = 0.5) -> None:
    """Wait for process `pid` to end, then end what it started. vLLM forks its
    engine and workers, and a forked process never shows the mark where we can
    read it (/proc/PID/environ is the environment it was exec'd with), and
    loses its parent when `pid` dies: so its processes are noted while it runs."""
    try:
        fd = os.pidfd_open(pid)
    except ProcessLookupError:
        fd = None
    seen = {}
    while fd is not None and not select.select([fd], [], [], every)[0]:
        seen.update((p.pid, p) for p in descendants(pid))
    end([*seen.values(), *marked(pid)])


if __name__ == "__main__":
    guard(int(sys.argv[1]))
