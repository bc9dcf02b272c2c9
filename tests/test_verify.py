"""presharded-verify checks every byte against the manifest and, with
--source, compares greedy tokens; checkpoints without a manifest still load."""

import json
import shutil

from conftest import refused, run_script
from presharded.manifest import MANIFEST_NAME

VERIFY = "presharded.verify_cli"


def test_verify_passes_on_a_good_checkpoint(checkpoints):
    proc = run_script(VERIFY, str(checkpoints(2, 1)), "--json")
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert json.loads(proc.stdout) == {"checkpoint": str(checkpoints(2, 1)), "files": 7, "start_cache_files": 0,
                                       "snapshot_files": 0, "hashes_match": True}


def test_verify_finds_a_flipped_byte(checkpoints, tmp_path):
    checkpoint = shutil.copytree(checkpoints(2, 1), tmp_path / "tp2")
    path = checkpoint / "model-rank-0-part-0.safetensors"
    data = bytearray(path.read_bytes())
    data[-7] ^= 0x80
    path.write_bytes(bytes(data))
    line = refused("verify: a flipped byte", VERIFY, str(checkpoint), unchanged=checkpoint)
    assert "model-rank-0-part-0.safetensors does not match its hash" in line


def test_verify_finds_a_stray_file(checkpoints, tmp_path):
    checkpoint = shutil.copytree(checkpoints(2, 1), tmp_path / "tp2")
    (checkpoint / "notes.txt").write_text("not part of it")
    line = refused("verify: a stray file", VERIFY, str(checkpoint), unchanged=checkpoint)
    assert "notes.txt is not part of this checkpoint" in line


def test_verify_compares_tokens_with_the_source(checkpoints, tiny_model):
    proc = run_script(VERIFY, str(checkpoints(1, 1)), "--source", str(tiny_model), "--enforce-eager")
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "give the same greedy tokens on 3 prompts" in proc.stdout


def test_foreign_checkpoint_loads_with_a_warning(checkpoints, reference_tokens, tmp_path):
    """As vLLM's own example writes it: the same files, no manifest."""
    foreign = shutil.copytree(checkpoints(1, 1), tmp_path / "foreign")
    (foreign / MANIFEST_NAME).unlink()
    proc = run_script("load_sharded_state.py", "--model", str(foreign), "--enforce-eager", "--max-tokens", "24",
                      "--json")
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert f"has no {MANIFEST_NAME}" in proc.stderr and "cannot be checked" in proc.stderr
    assert json.loads(proc.stdout)["token_ids"] == reference_tokens(1, 1)
    line = refused("verify: a checkpoint without a manifest", VERIFY, str(foreign), unchanged=foreign)
    assert "nothing to verify it against" in line
