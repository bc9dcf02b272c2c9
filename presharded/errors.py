"""Bad input ends in one line that names the problem and the fix, and exit 1;
Ctrl-C ends in `interrupted` and exit 130. (What vLLM's engine prints around
a refusal of ours: presharded/engine_output.py.)"""

import functools
import os
import sys
from collections.abc import Callable
from typing import TypeVar

from presharded.shutdown import REFUSAL_ENV, failure, interrupted

T = TypeVar("T")
_before_the_error_line: list[Callable[[], object]] = []


class UserError(Exception):
    """A problem with what the user asked for, told in one line."""


def exits_cleanly(main: Callable[[], T]) -> Callable[[], T]:
    """Run `main`; turn a UserError into `error: ...` on stderr and exit code 1."""

    @functools.wraps(main)
    def wrapper() -> T:
        try:
            return main()
        except UserError as e:
            for flush in _before_the_error_line:
                flush()
            print(f"error: {e}", file=sys.stderr, flush=True)
            sys.stdout.flush()
            os._exit(1)  # now: a running engine's shutdown would log after our line
        except BaseException as e:
            if reason := failure(wait=True):  # another thread ended the script (presharded/shutdown.py)
                print(f"error: {reason}", file=sys.stderr, flush=True)
                os._exit(1)
            if isinstance(e, KeyboardInterrupt) or interrupted():  # vLLM may turn it into an error of its own
                print("interrupted", file=sys.stderr)
                sys.exit(130)
            raise

    return wrapper




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
                with open(path, "a") as f:
                    f.write(f"{e}\n")
            raise

    return wrapper
