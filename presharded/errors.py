"""Bad input ends in one line that names the problem and the fix, and exit 1;
Ctrl-C ends in `interrupted` and exit 130."""

import functools
import sys
from collections.abc import Callable
from typing import TypeVar

from presharded.lifetime import interrupted

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
        except BaseException as e:
            if isinstance(e, KeyboardInterrupt) or interrupted():  # vLLM may turn it into an error of its own
                print("interrupted", file=sys.stderr)
                sys.exit(130)
            raise

    return wrapper
