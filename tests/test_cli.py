"""The scripts' command lines: help lists our flags and vLLM's; sizes parse."""

import pytest

from conftest import run_script
from presharded.flags import parse_size


@pytest.mark.parametrize("script,ours", [("save_sharded_state.py", "--max-file-size"),
                                         ("load_sharded_state.py", "--verify-hashes")])
def test_help_lists_our_flags_and_every_engine_flag(script, ours):
    proc = run_script(script, "--help")
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert ours in proc.stdout and "--tensor-parallel-size" in proc.stdout and "--quantization" in proc.stdout


def test_parse_size():
    assert parse_size("5000000") == 5_000_000
    assert parse_size("500MB") == parse_size("500M") == 500 * 10**6
    assert parse_size("5GiB") == 5 * 2**30 and parse_size("200KiB") == 200 * 1024
