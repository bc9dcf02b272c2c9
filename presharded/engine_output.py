"""What vLLM's engine prints, around a refusal of ours inside it: the engine
reports no more than that a worker failed, so our code there writes its
one-line reason to a file, and the script (or, under `vllm serve`, the
process that started the engine) ends on that line instead of vLLM's
tracebacks, which go to a log file."""

import atexit
import logging
import os
import select
import shutil
import sys
import tempfile
import threading
import time
from collections import deque
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from presharded.errors import UserError, before_the_error_line, one_line
from presharded.env import REFUSAL_ENV
from presharded.shutdown import on_stuck_interrupt, watched


class HeldOutput:
    """What the engine writes to our pipe, held `hold` seconds, then written to the
    terminal, or to the log once a refusal's note exists."""

    def __init__(self, read_end: int, terminal: int, note: Path, hold: float) -> None:
        self.read_end, self.terminal, self.note, self.hold = read_end, terminal, note, hold
        self.held: deque[tuple[float, bytes]] = deque()
        self.lock = threading.Lock()

    def release(self, everything: bool = False) -> None:
        with self.lock:
            diverted = self.note.exists()
            while self.held and (everything or diverted or time.monotonic() - self.held[0][0] >= self.hold):
                chunk = self.held.popleft()[1]
                if diverted:
                    with open(self.note.parent / "engine.log", "ab") as f:
                        f.write(chunk)
                else:
                    os.write(self.terminal, chunk)

    def pump(self) -> bool:
        """Move what waits in the pipe to `held`, under the lock (so nothing read is ever
        in flight outside it); False once every writer has gone."""
        with self.lock:
            while True:
                try:
                    chunk = os.read(self.read_end, 65536)
                except BlockingIOError:
                    return True
                if not chunk:
                    return False
                self.held.append((time.monotonic(), chunk))

    def forward(self) -> None:
        """Until every writer has gone: at once on one node, every 0.2 s while held."""
        while self.pump():
            self.release()
            select.select([self.read_end], [], [], 0.2 if self.hold else None)
        self.release(everything=True)


@contextmanager
def engine_refusals() -> Iterator[None]:
    """Around starting vLLM's engine: a refusal raised inside it ends the script
    with its own one line. From the moment one is written, what the engine
    prints (vLLM's tracebacks of it) goes to a log file, not the terminal.
    Across several nodes the engine's output is held back 2 s first: vLLM
    sees a dead node's sockets close a moment before our watcher names it."""
    note = Path(tempfile.mkdtemp(prefix="presharded-")) / "refusal"
    os.environ[REFUSAL_ENV] = str(note)
    terminal = os.dup(2)
    read_end, write_end = os.pipe()
    os.dup2(write_end, 2)  # the engine's processes inherit it
    os.close(write_end)
    os.set_blocking(read_end, False)
    on_stuck_interrupt(lambda: os.dup2(terminal, 2))  # so that `interrupted` reaches the terminal
    output = HeldOutput(read_end, terminal, note, hold=2.0 if watched() else 0.0)
    threading.Thread(target=output.forward, daemon=True).start()
    atexit.register(output.release, everything=True)
    before_the_error_line(lambda: (output.pump(), output.release(everything=True)))  # the engine's words first
    try:
        yield
    except Exception:
        sys.stderr.flush()
        os.dup2(terminal, 2)
        _drained(read_end)  # the engine's last words, before ours
        if note.exists() and (reasons := note.read_text().splitlines()):
            raise UserError(reasons[0]) from None
        output.release(everything=True)
        from presharded.vllm_compat import config_refusal  # vLLM is imported by now

        if reason := config_refusal(sys.exc_info()[1]):
            raise UserError(reason) from None
        raise
    else:  # the note stays while the engine runs: a node lost later diverts its output too
        atexit.register(shutil.rmtree, note.parent, ignore_errors=True)
    finally:
        sys.stderr.flush()
        os.dup2(terminal, 2)  # the engine keeps the pipe; the forwarder serves it while it runs


def refusals_in_one_line() -> None:
    """For processes our scripts did not start (`vllm serve`), called by the
    plugin in each of vLLM's processes: once our code inside the engine has
    refused, vLLM's log records lose their tracebacks, and the process that
    started the engine ends on the refusal's `error:` line and exit 1."""
    if not os.environ.get(REFUSAL_ENV):  # the first of the processes: children inherit the path
        note = Path(tempfile.gettempdir()) / f"presharded-refusal-{os.getpid()}-{os.urandom(4).hex()}"
        os.environ[REFUSAL_ENV] = str(note)
        atexit.register(note.unlink, missing_ok=True)
        previous = sys.excepthook

        def refusal_last(kind, value, traceback) -> None:
            if note.exists() and (reasons := note.read_text().splitlines()):
                print(f"error: {one_line(reasons[0])}", file=sys.stderr, flush=True)
                note.unlink(missing_ok=True)
                sys.exit(1)
            previous(kind, value, traceback)

        sys.excepthook = refusal_last
    note = Path(os.environ[REFUSAL_ENV])

    class NoTracebacksOnceRefused(logging.Filter):
        def filter(self, record: logging.LogRecord) -> bool:
            if record.exc_info and note.exists():
                record.exc_info, record.exc_text = None, None
            return True

    for handler in logging.getLogger("vllm").handlers:
        handler.addFilter(NoTracebacksOnceRefused())


def _drained(fd: int, quiet: float = 0.3, limit: float = 5.0) -> None:
    """Until nothing has waited in `fd` for `quiet` seconds (or `limit` passed)."""
    deadline = time.monotonic() + limit
    while time.monotonic() < deadline and select.select([fd], [], [], quiet)[0]:
        time.sleep(0.05)
