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
from dataclasses import dataclass, field
from pathlib import Path

from presharded.env import ENGINE_OF_ENV as ENV, REFUSAL_ENV
from presharded.processes import SHARED, descendants, end, mapped_inodes, marked, wait_ended


@dataclass
class Ending:
    """How this script ends: what a Ctrl-C or another thread's `fail` has set, and what to do then."""

    interrupted: threading.Event = field(default_factory=threading.Event)
    cleanups: list[Callable[[], None]] = field(default_factory=list)  # if a Ctrl-C is swallowed
    first_on_interrupt: list[Callable[[], None]] = field(default_factory=list)
    failure: list[str] = field(default_factory=list)  # why another thread ended the script
    failed: threading.Event = field(default_factory=threading.Event)
    watched: list[float] = field(default_factory=list)  # a watcher may yet call `fail`: how long to wait
    ending: threading.Event = field(default_factory=threading.Event)  # the main thread ends the script
    guard: list[int] = field(default_factory=list)  # the guard process's pid
    shared_before: set[str] = field(default_factory=set)  # /dev/shm before the engine: what it leaves is told apart


_state = Ending()


def engine_dies_with_this_process() -> None:
    """Call before vLLM starts any process. A small guard process waits for
    this one to end, however it ends, then kills every process it started;
    Ctrl-C ends them at once, then raises KeyboardInterrupt."""
    if os.environ.get(ENV) == str(os.getpid()):
        return  # already: one guard is enough
    os.environ[ENV] = str(os.getpid())
    _state.shared_before.update(shared_now())
    guard = subprocess.Popen([sys.executable, "-m", "presharded.shutdown", str(os.getpid())], start_new_session=True,
                             stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    _state.guard.append(guard.pid)

    def interrupt(signum, frame) -> None:
        _state.interrupted.set()
        for tell in _state.first_on_interrupt:
            tell()
        end_started(os.getpid(), spare=_state.guard)
        threading.Thread(target=_exit_if_stuck, daemon=True).start()
        raise KeyboardInterrupt

    signal.signal(signal.SIGINT, interrupt)


def end_engine(timeout: float = 5.0) -> None:
    """Before a failing script's last line: every process its engine started killed and waited for,
    so that nothing they still write comes after that line; then what they made in /dev/shm and no
    process maps any more, removed."""
    if os.environ.get(ENV) != str(os.getpid()):
        return  # no engine was started
    procs = [p for p in [*descendants(os.getpid()), *marked(ENV, str(os.getpid()))] if p.pid not in _state.guard]
    held = mapped_inodes([os.getpid(), *(p.pid for p in procs)])
    end(procs)
    wait_ended(procs, timeout)
    remove_left_shared(_state.shared_before, held)


def shared_now() -> set[str]:
    return set(os.listdir(SHARED)) if SHARED.is_dir() else set()


ENGINE_FILES = ("psm_", "vllm", "sem.mp-")  # vLLM's queues and buffers, and semaphores


def unmapped_since(before: set[str], names: tuple[str, ...] = ENGINE_FILES) -> dict[Path, os.stat_result]:
    """The files in /dev/shm made since `before` under `names` that no process maps, with their status."""
    new = [SHARED / name for name in shared_now() - before if name.startswith(names)]
    mapped = mapped_inodes() if new else set()
    left = {}
    for path in new:
        try:
            st = path.lstat()
        except OSError:  # removed meanwhile
            continue
        if st.st_ino not in mapped:
            left[path] = st
    return left


def remove_left_shared(before: set[str], held: set[int]) -> None:
    """What an engine made in /dev/shm since `before`, that its processes mapped (`held`: inodes) and no
    process maps any more, removed: a killed engine leaves hundreds of MB there. Only its own: another
    engine on this machine may be making a file there that it has not mapped yet."""
    for path, st in unmapped_since(before).items():
        if st.st_uid == os.getuid() and st.st_ino in held:
            try:
                path.unlink()
            except OSError:
                continue


def fail(reason: str) -> None:
    """From any thread: end the engine and the script as Ctrl-C does, but with
    `error: reason` and exit 1 (presharded/errors.py prints it)."""
    if _state.failure or _state.interrupted.is_set():  # the first word stands; after a Ctrl-C, the user's
        return
    _state.failure.append(reason)
    if path := os.environ.get(REFUSAL_ENV):  # the engine's last words go to its log, not the terminal
        try:
            append_line(path, reason)
        except OSError:
            pass
    _state.failed.set()
    if not _state.ending.is_set():
        signal.pthread_kill(threading.main_thread().ident, signal.SIGINT)


def append_line(path: str, line: str) -> None:
    """`line` added to the file at `path` (made 0600), never through a symlink."""
    fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT | os.O_NOFOLLOW | os.O_CLOEXEC, 0o600)
    try:
        os.write(fd, f"{line}\n".encode())
    finally:
        os.close(fd)


def watched_by(seconds: float) -> None:
    """A watcher that may call `fail` runs: when the engine fails first (vLLM sees a
    dead peer's sockets close before we do), wait this long for its word (`failure`)."""
    _state.watched.append(seconds)


def watched() -> bool:
    return bool(_state.watched)


def failure(wait: bool = False) -> str | None:
    """Why another thread ended the script, if it did; with `wait`, the main thread
    is ending the script and waits for a watcher's word first."""
    if wait:
        _state.ending.set()
        if _state.watched and not _state.interrupted.is_set():
            _state.failed.wait(max(_state.watched))
    return _state.failure[0] if _state.failure else None


def first_on_interrupt(tell: Callable[[], None]) -> None:
    """What a Ctrl-C does before it ends the engine: other nodes hear of it from
    us before their engines see this one's sockets close (and print tracebacks)."""
    _state.first_on_interrupt.append(tell)


def on_stuck_interrupt(cleanup: Callable[[], None]) -> None:
    """What to undo if a Ctrl-C is swallowed: while vLLM waits for its engine
    (a zmq poll), the KeyboardInterrupt is lost and the wait goes on for minutes."""
    _state.cleanups.append(cleanup)


def _exit_if_stuck(grace: float = 3.0) -> None:
    time.sleep(grace)  # the main thread has had its chance to unwind and exit
    for cleanup in _state.cleanups:
        cleanup()
    end_engine()
    print(f"error: {failure()}" if failure() else "interrupted", file=sys.stderr, flush=True)
    os._exit(1 if failure() else 130)


def interrupted() -> bool:
    """Ctrl-C was pressed. Python drops a KeyboardInterrupt raised inside a
    `__del__` (it prints "Exception ignored") and carries on, and vLLM may
    turn one into its own error: ask this before publishing anything."""
    return _state.interrupted.is_set()


def end_started(pid: int, spare: list[int] = ()) -> None:
    """Kill every process `pid` started (forked ones too) and every process that carries its mark, but `spare`."""
    end([*descendants(pid), *marked(ENV, str(pid))], spare)


def guard(pid: int, every: float = 0.5) -> None:
    """Wait for process `pid` to end, then end what it started. vLLM forks its
    engine and workers, and a forked process never shows the mark where we can
    read it (/proc/PID/environ is the environment it was exec'd with), and
    loses its parent when `pid` dies: so its processes, and the files in /dev/shm they map, are noted while
    it runs (and what they made after the last look, by made_unseen). Then what they left there is removed."""
    before = shared_now()  # taken before the engine starts: the script starts its guard first
    try:
        fd = os.pidfd_open(pid)
    except ProcessLookupError:
        fd = None
    seen, held, looked = {}, set(), time.time_ns()
    while fd is not None and not select.select([fd], [], [], every)[0]:
        looked = time.time_ns()
        seen.update((p.pid, p) for p in descendants(pid))
        held |= mapped_inodes([pid, *seen])
    left = [p for p in [*seen.values(), *marked(ENV, str(pid))] if p.pid != os.getpid()]  # the guard carries the mark too
    held |= mapped_inodes([p.pid for p in left])
    end(left)
    wait_ended(left, 10)
    remove_left_shared(before, held | made_unseen(before, looked - 20_000_000))


def made_unseen(before: set[str], since_ns: int, grace: float = 1.0) -> set[int]:
    """The inodes of the files made in /dev/shm since the guard last looked (`since_ns`, a tick early for the
    file system's coarse clock) that no process maps, nor does `grace` seconds later: its engine's, made as it
    died (a worker dies with its script, maps and all). Another engine maps what it makes at once."""
    first = {path: st.st_ino for path, st in unmapped_since(before).items() if st.st_ctime_ns >= since_ns}
    if not first:
        return set()
    time.sleep(grace)
    later = unmapped_since(before)
    return {ino for path, ino in first.items() if path in later and later[path].st_ino == ino}


if __name__ == "__main__":
    guard(int(sys.argv[1]))
