"""Process trees, through psutil (and /proc for what psutil does not read:
mappings and the pages they hold, namespaces' PIDs, device files): finding a
process's descendants, killing them, waiting for them, reaping a restored tree."""

import ctypes
import os
import time
from pathlib import Path

import psutil

SHARED = Path("/dev/shm")
PAGE = os.sysconf("SC_PAGE_SIZE")


def descendants(pid: int) -> list[psutil.Process]:
    try:
        return psutil.Process(pid).children(recursive=True)
    except psutil.Error:
        return []


def tree(pid: int) -> list[int]:
    """`pid` and every process under it, parents before their children."""
    return [pid, *(p.pid for p in descendants(pid))]


def kill(pids: list[int]) -> None:
    """The processes of a tree (as `tree` lists them) killed, the deepest first; those gone already skipped."""
    for each in pids[::-1]:
        try:
            os.kill(each, 9)
        except ProcessLookupError:
            pass


def kill_tree(pid: int) -> None:
    kill(tree(pid))


def marked(variable: str, value: str) -> list[psutil.Process]:
    """Processes whose environment, as they were started, sets `variable` to `value` (a forked
    process shows its parent's first environment)."""
    found = []
    for proc in psutil.process_iter():
        try:
            if proc.environ().get(variable) == value:
                found.append(proc)
        except psutil.Error:
            pass
    return found


def end(procs: list[psutil.Process], spare: list[int] = ()) -> None:
    """`procs` killed, but this process and `spare`."""
    for proc in procs:
        try:
            if proc.pid != os.getpid() and proc.pid not in spare:
                proc.kill()  # psutil checks that the pid is still this process, not a new one
        except psutil.Error:
            pass


def running(proc: psutil.Process) -> bool:
    """Whether `proc` still runs: a zombie has ended (its memory is released; whoever reaps it may be slow)."""
    try:
        return proc.is_running() and proc.status() != psutil.STATUS_ZOMBIE
    except psutil.Error:
        return False


def wait_ended(procs: list[psutil.Process], timeout: float) -> None:
    """Until every one of `procs` has ended, or `timeout` (psutil's own wait would wait for the reaping)."""
    deadline = time.monotonic() + timeout
    while any(running(p) for p in procs) and time.monotonic() < deadline:
        time.sleep(0.02)


def mapped_inodes(pids: list[int] | None = None) -> set[int]:
    """The inodes of the files in /dev/shm that the processes `pids` (all, by default) map."""
    inodes = set()
    for pid in pids if pids is not None else psutil.pids():
        try:
            maps = Path(f"/proc/{pid}/maps").read_text().splitlines()
        except OSError:
            continue
        inodes |= {int(line.split()[4]) for line in maps if f" {SHARED}/" in line}
    return inodes


def mapped_pages(pids: list[int], gap: int = 128 * 2**10) -> dict[str, list[list[int]]]:
    """The parts of regular files that the processes `pids` hold in memory through their mappings (the
    pages present, in /proc/PID/pagemap): per file, [offset, length] ranges, those less than `gap`
    apart joined. What a restore of these processes reads from those files, a page at a time."""
    import numpy as np  # here: a restore's path imports this module, and numpy takes 0.25 s there

    pages: dict[str, list[np.ndarray]] = {}
    for pid in pids:
        try:
            maps = Path(f"/proc/{pid}/maps").read_text().splitlines()
            pagemap = open(f"/proc/{pid}/pagemap", "rb")
        except OSError:
            continue
        with pagemap:
            for line in maps:
                fields = line.split(maxsplit=5)
                if len(fields) < 6 or fields[4] == "0" or not fields[5].startswith("/") or \
                        fields[5].startswith("/dev/") or fields[5].endswith(" (deleted)"):
                    continue  # anonymous, device or shared memory, or gone: not read from a file
                start, end = (int(x, 16) for x in fields[0].split("-"))
                pagemap.seek(start // PAGE * 8)
                entries = np.frombuffer(pagemap.read((end - start) // PAGE * 8), dtype=np.uint64)
                present = np.flatnonzero(entries >> np.uint64(63))  # bit 63: the page is in memory
                pages.setdefault(fields[5], []).append(int(fields[2], 16) // PAGE + present)
    ranges = {}
    for path, parts in sorted(pages.items()):
        index = np.unique(np.concatenate(parts))
        if not index.size or not os.path.isfile(path):
            continue
        breaks = np.flatnonzero(np.diff(index) * PAGE > gap + PAGE) + 1
        ranges[path] = [[int(run[0]) * PAGE, (int(run[-1]) + 1 - int(run[0])) * PAGE]
                        for run in np.split(index, breaks)]
    return ranges


def ns_pid(pid: int) -> int | None:
    """The PID that process `pid` has in its own (innermost) PID namespace; None if it is gone."""
    try:
        status = Path(f"/proc/{pid}/status").read_text()
    except OSError:
        return None
    return int(next(line for line in status.splitlines() if line.startswith("NSpid:")).split()[-1])


def holds_gpu(pid: int) -> bool:
    """Whether the process has an NVIDIA device open (what CRIU cannot dump): cuda-checkpoint must release it."""
    try:
        fds = list(Path(f"/proc/{pid}/fd").iterdir())
    except OSError:
        return False
    for fd in fds:
        try:
            if os.readlink(fd).startswith("/dev/nvidia"):
                return True
        except OSError:
            continue
    return False


def become_subreaper() -> None:
    """Orphans below this process become its children: waited for, and killed with it."""
    ctypes.CDLL(None, use_errno=True).prctl(36, 1, 0, 0, 0)  # PR_SET_CHILD_SUBREAPER


def alive(pid: int) -> bool:
    try:
        return os.waitpid(pid, os.WNOHANG) == (0, 0)
    except ChildProcessError:  # not our child: is it there at all
        try:
            os.kill(pid, 0)
            return True
        except ProcessLookupError:
            return False


def reap(pid: int) -> None:
    """Our child `pid` waited for (10 s at most), then killed."""
    for _ in range(1000):
        if not alive(pid):
            return
        time.sleep(0.01)
    os.kill(pid, 9)


def end_children() -> None:
    """Every process under this one killed and reaped, read from /proc now: no PID remembered from
    before, which another process could have taken since (a zombie keeps its PID until reaped)."""
    children = tree(os.getpid())[1:]
    kill(children)
    for each in children:
        try:
            os.waitpid(each, 0)
        except ChildProcessError:
            pass
