"""An engine snapshot's page files keep their zeros as holes (presharded/snapshot.py): the same bytes when
read, fewer on the disk."""

import os

import pytest

from presharded.snapshot import SPARSE_BLOCK, make_sparse


def test_zeros_become_holes_and_the_bytes_stay(tmp_path):
    data = os.urandom(3 * SPARSE_BLOCK + 100)
    content = data[:SPARSE_BLOCK] + bytes(40 * SPARSE_BLOCK) + data[SPARSE_BLOCK:] + bytes(8 * SPARSE_BLOCK + 5)
    pages = tmp_path / "pages-1.img"
    pages.write_bytes(content)
    pages.chmod(0o600)
    make_sparse(pages)
    assert pages.read_bytes() == content
    assert pages.stat().st_blocks * 512 < len(data) + 8 * SPARSE_BLOCK  # the 48 blocks of zeros are not stored
    assert oct(pages.stat().st_mode & 0o777) == "0o600" and os.listdir(tmp_path) == ["pages-1.img"]


def test_a_name_planted_beside_the_pages_is_not_written_through(tmp_path):
    pages, elsewhere = tmp_path / "pages-1.img", tmp_path / "elsewhere"
    pages.write_bytes(b"pages")
    (tmp_path / ".pages-1.img.sparse").symlink_to(elsewhere)
    with pytest.raises(FileExistsError):
        make_sparse(pages)
    assert not elsewhere.exists() and pages.read_bytes() == b"pages"
