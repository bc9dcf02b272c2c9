"""A checkpoint that does not fit the request, or is damaged, is refused before
vLLM is imported: exit 1, one line naming the problem and the fix, under 5 s."""

import json
import shutil

import pytest

from conftest import refused, run_script
from presharded.files import UNFINISHED_MARKER

LOAD = "load_sharded_state.py"


@pytest.fixture
def tp2_copy(checkpoints, tmp_path):
    return shutil.copytree(checkpoints(2, 1), tmp_path / "tp2")


def test_tp2_checkpoint_at_tp1(checkpoints):
    line = refused("TP=2 checkpoint loaded at TP=1", LOAD, "--model", str(checkpoints(2, 1)),
                   "--tensor-parallel-size", "1", unchanged=checkpoints(2, 1))
    assert "saved for tensor-parallel size 2 but 1 was asked" in line
    assert "--tensor-parallel-size 2" in line


def test_tp1_checkpoint_at_tp2(checkpoints):
    line = refused("TP=1 checkpoint loaded at TP=2", LOAD, "--model", str(checkpoints(1, 1)), "-tp", "2",
                   unchanged=checkpoints(1, 1))
    assert "saved for tensor-parallel size 1 but 2 was asked" in line


def test_pp_mismatch(checkpoints):
    line = refused("PP=2 checkpoint loaded at PP=1", LOAD, "--model", str(checkpoints(1, 2)),
                   "--pipeline_parallel_size", "1", unchanged=checkpoints(1, 2))
    assert "saved for pipeline-parallel size 2 but 1 was asked" in line


def test_missing_rank_file(tp2_copy):
    (tp2_copy / "model-rank-1-part-0.safetensors").unlink()
    line = refused("a rank's file missing", LOAD, "--model", str(tp2_copy), unchanged=tp2_copy)
    assert "model-rank-1-part-0.safetensors is missing" in line


def test_truncated_file(tp2_copy):
    path = tp2_copy / "model-rank-0-part-0.safetensors"
    path.write_bytes(path.read_bytes()[:-100])
    line = refused("a truncated file", LOAD, "--model", str(tp2_copy), unchanged=tp2_copy)
    assert "model-rank-0-part-0.safetensors has" in line and "the manifest says" in line


def test_flipped_byte_with_verify_hashes(tp2_copy):
    path = tp2_copy / "model-rank-1-part-0.safetensors"
    data = bytearray(path.read_bytes())
    data[len(data) // 2] ^= 0x01
    path.write_bytes(bytes(data))
    line = refused("a flipped byte (--verify-hashes)", LOAD, "--model", str(tp2_copy), "--verify-hashes",
                   unchanged=tp2_copy)
    assert "model-rank-1-part-0.safetensors does not match its hash" in line


def test_stray_part_file(tp2_copy):
    shutil.copy(tp2_copy / "model-rank-1-part-0.safetensors", tp2_copy / "model-rank-1-part-1.safetensors")
    line = refused("a stray part file", LOAD, "--model", str(tp2_copy), unchanged=tp2_copy)
    assert "model-rank-1-part-1.safetensors is not part of this checkpoint" in line


def test_malformed_manifest(tp2_copy):
    (tp2_copy / "presharded.json").write_text('{"format": "presharded", "format_version": 1')
    line = refused("a malformed manifest", LOAD, "--model", str(tp2_copy), unchanged=tp2_copy)
    assert "presharded.json is not valid JSON" in line


def test_manifest_missing_fields(tp2_copy):
    (tp2_copy / "presharded.json").write_text('{"format": "presharded", "format_version": 1}')
    line = refused("a manifest lacking fields", LOAD, "--model", str(tp2_copy), unchanged=tp2_copy)
    assert "presharded.json lacks the field 'shards'" in line


def test_unreadable_manifest(tp2_copy):
    (tp2_copy / "presharded.json").write_bytes(b"\xff\xfe\x00garbage")
    line = refused("an unreadable manifest", LOAD, "--model", str(tp2_copy), unchanged=tp2_copy)
    assert "cannot read" in line and "presharded.json" in line


def test_newer_manifest_version(tp2_copy):
    manifest = json.loads((tp2_copy / "presharded.json").read_text())
    manifest["format_version"] = 99
    (tp2_copy / "presharded.json").write_text(json.dumps(manifest))
    line = refused("a manifest of a newer format", LOAD, "--model", str(tp2_copy), unchanged=tp2_copy)
    assert "format version 99" in line and "upgrade presharded" in line


def test_missing_checkpoint(tmp_path):
    line = refused("a checkpoint path that does not exist", LOAD, "--model", str(tmp_path / "nope"))
    assert "is not a folder" in line


def test_unfinished_save(tp2_copy):
    (tp2_copy / UNFINISHED_MARKER).touch()
    line = refused("an unfinished save (staging folder)", LOAD, "--model", str(tp2_copy), unchanged=tp2_copy)
    assert "is an unfinished save" in line


def test_online_quantized_with_sharded_state(tp2_copy):
    # What --quantization fp8 over bf16 weights saves (a GPU-only path; see docs/gpu.md):
    # vLLM's sharded_state would copy into weights that are still on the meta device.
    manifest = json.loads((tp2_copy / "presharded.json").read_text())
    manifest.update(quantization="fp8", online_quantization=True)
    (tp2_copy / "presharded.json").write_text(json.dumps(manifest))
    line = refused("online-quantized weights with sharded_state", LOAD, "--model", str(tp2_copy), unchanged=tp2_copy)
    assert "quantizes (fp8) while loading" in line and "--load-format fast_sharded_state" in line
    summary = run_script("presharded.inspect_cli", str(tp2_copy)).stdout
    assert "quantization fp8 (applied while loading: load with fast_sharded_state)" in summary
