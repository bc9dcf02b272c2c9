"""Start-up caches inside the checkpoint: made by one start, used by a later
start of a moved copy with empty caches of its own (vLLM's CPU build compiles
with Inductor), left unused with a warning when damaged."""

import json
import shutil

import pytest

from conftest import PROMPT, run_script
from presharded.manifest import read_manifest
from presharded.start_caches import CACHES_DIR, WORKSPACE, checkpoint_id


def start(model, tmp_path, *flags: str) -> tuple[dict, str]:
    """A compiled start (no --enforce-eager) with empty user caches."""
    user = tmp_path / "user-caches"
    shutil.rmtree(user, ignore_errors=True)
    proc = run_script("load_sharded_state.py", "--model", str(model), "--prompt", PROMPT, "--max-tokens", "24",
                      "--json", *flags,
                      env={"VLLM_CACHE_ROOT": str(user / "vllm"), "TORCHINDUCTOR_CACHE_DIR": str(user / "inductor")})
    assert proc.returncode == 0, proc.stderr[-3000:]
    return json.loads(proc.stdout), proc.stderr


@pytest.fixture(scope="module")
def cached(checkpoints, tmp_path_factory):
    """A copy of the TP=1 checkpoint with a set of start-up caches, then moved."""
    root = tmp_path_factory.mktemp("caches")
    shutil.copytree(checkpoints(1, 1), root / "made-here")
    proc = run_script("presharded.caches_cli", str(root / "made-here"))
    assert proc.returncode == 0, proc.stderr[-3000:]
    shutil.move(root / "made-here", root / "moved")
    return root / "moved"


def test_a_set_is_in_the_manifest(cached):
    manifest = read_manifest(cached)
    (name, entries), = manifest.caches.items()
    assert entries and all((cached / e.path).is_file() for e in entries)
    assert all(e.path.startswith(f"{CACHES_DIR}/{name}/") for e in entries)
    proc = run_script("presharded.verify_cli", str(cached))  # every file, the caches too, is in the manifest
    assert proc.returncode == 0, proc.stderr[-3000:]


def test_a_moved_copy_starts_from_the_caches(cached, tmp_path):
    shutil.rmtree(WORKSPACE / checkpoint_id(read_manifest(cached)), ignore_errors=True)  # a fresh node
    with_caches, _ = start(cached, tmp_path)
    assert not any(p.is_file() for p in (tmp_path / "user-caches").rglob("*"))  # the user's caches: untouched
    without, _ = start(cached, tmp_path, "--no-start-caches")
    assert (with_caches["caches"], without["caches"]) == ("hit", "none")
    assert with_caches["token_ids"] == without["token_ids"]


def test_a_damaged_set_is_left_unused(cached, tmp_path):
    damaged = tmp_path / "damaged"
    shutil.copytree(cached, damaged)
    entry = read_manifest(damaged).caches.popitem()[1][0]
    (damaged / entry.path).write_bytes(b"not what was compiled")
    out, stderr = start(damaged, tmp_path)
    reference, _ = start(cached, tmp_path, "--no-start-caches")
    assert out["caches"] == "none" and out["token_ids"] == reference["token_ids"]
    warnings = [line for line in stderr.splitlines() if line.startswith("warning:") and "start-up caches" in line]
    assert len(warnings) == 1 and "missing or damaged" in warnings[0]
