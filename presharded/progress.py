"""Progress bars for long work (a save's writes per rank, verify's hashing,
copying a set of start-up caches): tqdm on stderr, shown only where someone
watches, a terminal and no --json. vLLM's workers write into a pipe, so the
script that started them decides for them (PRESHARDED_PROGRESS)."""

import os
import sys

from presharded.env import PROGRESS_ENV as ENV


def decide(quiet: bool) -> None:
    """Bars for this process and the engine it starts: on a terminal, unless `quiet` (--json)."""
    os.environ[ENV] = "0" if quiet or not sys.stderr.isatty() else "1"


def bar(total: float, what: str, unit: str = "B", position: int = 0):
    """A tqdm bar (imported here: a load that shows none need not import it)."""
    from tqdm import tqdm

    shown = os.environ.get(ENV, "1" if sys.stderr.isatty() else "0") == "1"
    return tqdm(total=total, desc=what, unit=unit, unit_scale=unit == "B", disable=not shown, file=sys.stderr,
                leave=False, position=position, dynamic_ncols=True)
