"""Reading the weights ahead (--prefetch): the files end up in the page cache,
with no copy in the process; skipped when they do not fit (a load with it: the
round trip at TP=1 in test_round_trip.py)."""

import os

from presharded import prefetch
from presharded.prefetch import cached_fraction


def evict(path) -> None:
    fd = os.open(path, os.O_RDONLY)
    os.fsync(fd)
    os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
    os.close(fd)


def test_prefetch_fills_the_page_cache(tmp_path):
    path = tmp_path / "weights.bin"
    path.write_bytes(os.urandom(32 * 2**20))
    evict(path)
    before = cached_fraction(path)
    prefetch.read_ahead([path]).join(timeout=60)
    assert before < 0.5 and cached_fraction(path) > 0.95


def test_prefetch_is_skipped_when_the_files_do_not_fit(tmp_path, monkeypatch, capsys):
    path = tmp_path / "weights.bin"
    path.write_bytes(b"\0" * 2**20)
    monkeypatch.setattr(prefetch, "available_memory", lambda: 2**19)
    assert prefetch.read_ahead([path]) is None
    assert capsys.readouterr().err.startswith("warning: not reading the weights ahead: ")

