"""A checkpoint that does not fit the request is refused before any engine
starts: exit 1, one line naming what was saved and what was asked."""

import shutil
import time

import pytest

from conftest import run_script


def refused(*args: str) -> str:
    start = time.perf_counter()
    proc = run_script("load_sharded_state.py", *args)
    elapsed = time.perf_counter() - start
    assert proc.returncode == 1, proc.stderr[-2000:]
    assert proc.stdout == ""
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), proc.stderr[-2000:]
    assert elapsed < 5, f"refused only after {elapsed:.1f} s: vLLM was imported first"
    return lines[0]


@pytest.fixture
def tp2_copy(checkpoints, tmp_path):
    return shutil.copytree(checkpoints(2, 1), tmp_path / "tp2")


def test_tp2_checkpoint_at_tp1(checkpoints):
    line = refused("--model", str(checkpoints(2, 1)), "--tensor-parallel-size", "1")
    assert "saved for tensor-parallel size 2 but 1 was asked" in line
    assert "--tensor-parallel-size 2" in line


def test_tp1_checkpoint_at_tp2(checkpoints):
    line = refused("--model", str(checkpoints(1, 1)), "-tp", "2")
    assert "saved for tensor-parallel size 1 but 2 was asked" in line


def test_pp_mismatch(checkpoints):
    line = refused("--model", str(checkpoints(1, 2)), "--pipeline_parallel_size", "1")
    assert "saved for pipeline-parallel size 2 but 1 was asked" in line


def test_missing_rank_file(tp2_copy):
    (tp2_copy / "model-rank-1-part-0.safetensors").unlink()
    line = refused("--model", str(tp2_copy))
    assert "model-rank-1-part-0.safetensors is missing" in line


def test_stray_part_file(tp2_copy):
    shutil.copy(tp2_copy / "model-rank-1-part-0.safetensors", tp2_copy / "model-rank-1-part-1.safetensors")
    line = refused("--model", str(tp2_copy))
    assert "model-rank-1-part-1.safetensors is not part of this checkpoint" in line
