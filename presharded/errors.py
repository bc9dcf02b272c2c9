"""Bad input ends in one line that names the problem and the fix, and exit 1;
Ctrl-C ends in `interrupted` and exit 130."""

import functools
import signal
import sys
import threading
from collections.abc import Callable
from typing import TypeVar

T = TypeVar("T")


class UserError(Exception):
    """A problem with what the user asked for, told in one line."""


def exits_cleanly(main: Callable[[], T]) -> Callable[[], T]:
    """Run `main`; turn a UserError into `error: ...` on stderr and exit code 1."""

    @functools.wraps(main)
    def wrapper() -> T:
        try:
            return main()
        except UserError as e:
            print(f"error: {e}", file=sys.stderr)
            sys.exit(1)
        except KeyboardInterrupt:
            print("interrupted", file=sys.stderr)
            sys.exit(130)

    return wrapper


_interrupted = threading.Event()


def remember_interrupts() -> None:
    """Ctrl-C still raises KeyboardInterrupt, and is remembered as well: Python
    drops one raised inside a `__del__` (it prints "Exception ignored") and
    carries on, so check `raise_if_interrupted` before anything is published."""

    def interrupt(signum, frame) -> None:
        _interrupted.set()
        raise KeyboardInterrupt

    signal.signal(signal.SIGINT, interrupt)


def raise_if_interrupted() -> None:
    if _interrupted.is_set():
        raise KeyboardInterrupt
