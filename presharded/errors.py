"""Bad input ends in one line that names the problem and the fix, and exit 1;
Ctrl-C ends in `interrupted` and exit 130. (What vLLM's engine prints around
a refusal of ours: presharded/engine_output.py.)"""

import functools
import os
import sys
from collections.abc import Callable
from typing import NoReturn, TypeVar

from presharded.env import REFUSAL_ENV
from presharded.shutdown import append_line, end_engine, failure, interrupted

T = TypeVar("T")
_before_the_error_line: list[Callable[[], object]] = []


class UserError(Exception):
    """A problem with what the user asked for, told in one line."""


def one_line(text: str) -> str:
    """`text` as one line of printable text: a name from a checkpoint (a file's, a tensor's) may hold
    a newline and a line of its own, which is shown escaped, never as a line."""
    return "".join(c if c.isprintable() else repr(c)[1:-1] for c in str(text))


def exits_cleanly(main: Callable[[], T]) -> Callable[[], T]:
    """Run `main`; turn a UserError into `error: ...` on stderr and exit code 1."""

    @functools.wraps(main)
    def wrapper() -> T:
        try:
            return main()
        except UserError as e:
            last_line(str(e))
        except BaseException as e:
            if reason := failure(wait=True):  # another thread ended the script (presharded/shutdown.py)
                last_line(reason)
            if isinstance(e, KeyboardInterrupt) or interrupted():  # vLLM may turn it into an error of its own
                print("interrupted", file=sys.stderr)
                sys.exit(130)
            raise

    return wrapper


def last_line(reason: str) -> NoReturn:
    """`error: reason` as the script's last line, and exit 1: the engine's processes ended first and
    what they wrote before shown (or sent to its log), so that nothing of theirs comes after it."""
    end_engine()
    for flush in _before_the_error_line:
        flush()
    sys.stdout.flush()
    sys.stderr.flush()
    terminal = os.dup(2)
    os.dup2(os.open(os.devnull, os.O_WRONLY), 2)  # what any other thread still writes goes nowhere
    os.write(terminal, f"error: {one_line(reason)}\n".encode())
    os._exit(1)  # now: a running engine's shutdown would log after our line


def before_the_error_line(flush: Callable[[], object]) -> None:
    """What must reach the terminal before our `error:` line (the engine's output, relayed by a thread)."""
    _before_the_error_line.append(flush)


def refuses(method: Callable[..., T]) -> Callable[..., T]:
    """For our code that runs inside vLLM's engine (the loaders): a UserError
    it raises is also written where the script that started the engine reads
    it, since the engine reports no more than that a worker failed."""

    @functools.wraps(method)
    def wrapper(*args, **kwargs) -> T:
        try:
            return method(*args, **kwargs)
        except UserError as e:
            if path := os.environ.get(REFUSAL_ENV):
                append_line(path, one_line(e))
            raise

    return wrapper
