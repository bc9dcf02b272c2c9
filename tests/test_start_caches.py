"""Start-up caches inside the checkpoint: made by the save (or by
presharded-caches) from one start, used by a later start of a moved copy with
empty caches of its own (vLLM's CPU build compiles with Inductor), shared by
starts at the same time, left unused with a warning when damaged."""

import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from conftest import PROMPT, ROOT, run_script, script_env, serving
from presharded.manifest import read_manifest
from presharded import start_caches
from presharded.start_caches import CACHES_DIR, KINDS, WORKSPACE, checkpoint_id, files_under


def user_caches(tmp_path, name: str = "user-caches") -> dict[str, str]:
    """Empty cache folders of the user's own, for one start."""
    shutil.rmtree(tmp_path / name, ignore_errors=True)
    return {"VLLM_CACHE_ROOT": str(tmp_path / name / "vllm"), "TORCHINDUCTOR_CACHE_DIR": str(tmp_path / name / "inductor")}


def start(model, tmp_path, *flags: str, env: dict[str, str] | None = None) -> tuple[dict, str]:
    """A compiled start (no --enforce-eager) with empty user caches."""
    proc = run_script("load_sharded_state.py", "--model", str(model), "--prompt", PROMPT, "--max-tokens", "24",
                      "--json", *flags, env={**user_caches(tmp_path), **(env or {})})
    assert proc.returncode == 0, proc.stderr[-3000:]
    return json.loads(proc.stdout), proc.stderr


@pytest.fixture(scope="module")
def cached(tiny_model, tmp_path_factory):
    """The tiny model saved with a set of start-up caches, then moved."""
    root = tmp_path_factory.mktemp("caches")
    proc = run_script("save_sharded_state.py", "--model", str(tiny_model), "--output", str(root / "made-here"),
                      "--start-caches", "--json", env=user_caches(root))
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert json.loads(proc.stdout)["caches"] in read_manifest(root / "made-here").caches
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
    with_caches, log = start(cached, tmp_path, env={"TORCH_LOGS": "torch._inductor.codecache"})
    # vLLM's CPU build logs nothing of its compile cache; the compiler (Inductor) does
    assert "fx graph cache hit" in log and "fx graph cache miss" not in log, log[-3000:]
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


def test_starts_at_the_same_time_share_the_set(cached, tmp_path):
    """Replicas of one checkpoint on one machine (one per GPU) share its caches' fixed place."""
    shutil.rmtree(WORKSPACE / checkpoint_id(read_manifest(cached)), ignore_errors=True)
    cmd = [sys.executable, str(ROOT / "load_sharded_state.py"), "--model", str(cached), "--prompt", PROMPT,
           "--max-tokens", "24", "--json"]
    procs = [subprocess.Popen(cmd, cwd=ROOT, env={**script_env(1), **user_caches(tmp_path, f"user-{i}")},
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True) for i in range(2)]
    outs = [p.communicate(timeout=300) for p in procs]
    assert [p.returncode for p in procs] == [0, 0], outs[0][1][-2000:] + outs[1][1][-2000:]
    results = [json.loads(out) for out, _ in outs]
    assert [r["caches"] for r in results] == ["hit", "hit"]
    assert results[0]["token_ids"] == results[1]["token_ids"]


def test_presharded_caches_adds_a_set_to_a_checkpoint(checkpoints, tmp_path):
    ckpt = shutil.copytree(checkpoints(1, 1), tmp_path / "ckpt")
    assert not read_manifest(ckpt).caches
    proc = run_script("presharded.caches_cli", str(ckpt), env=user_caches(tmp_path))
    assert proc.returncode == 0, proc.stderr[-3000:]
    (name, entries), = read_manifest(ckpt).caches.items()
    assert proc.stdout.startswith(f"{ckpt}: start-up caches {name} ({len(entries)} files")


def test_vllm_serve_starts_from_the_set(cached, tmp_path):
    """`presharded-caches --serve` adds what vLLM's server compiles (on GPUs its defaults differ from the
    load script's; on CPU they compile alike); `eval "$(presharded-caches --env CKPT)"`, then the server on
    $PRESHARDED_MODEL compiles nothing, its first request included."""
    served = shutil.copytree(cached, tmp_path / "served")
    workspace = WORKSPACE / checkpoint_id(read_manifest(served))
    proc = run_script("presharded.caches_cli", "--serve", str(served), timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert run_script("presharded.verify_cli", str(served)).returncode == 0  # the set, as it is now, in the manifest
    shutil.rmtree(workspace, ignore_errors=True)
    proc = run_script("presharded.caches_cli", "--env", str(served))
    assert proc.returncode == 0, proc.stderr[-3000:]
    env = dict(line.removeprefix("export ").split("=", 1) for line in proc.stdout.splitlines())
    assert env["PRESHARDED_MODEL"] == str(workspace / "model")
    before = {k: files_under(workspace / k) for k in KINDS}
    with serving(Path(env.pop("PRESHARDED_MODEL")), "--served-model-name", "tiny", "--load-format",
                 "fast_sharded_state", env=env) as complete:
        choice = complete("tiny", PROMPT)
    assert {k: files_under(workspace / k) for k in KINDS} == before  # a hit: the server compiled nothing
    reference, _ = start(served, tmp_path, "--no-start-caches")
    assert choice["token_ids"] == reference["token_ids"]


def test_a_kill_while_a_set_is_copied_leaves_the_old_set(cached, tmp_path, monkeypatch):
    """A failure while keep() copies the caches into the checkpoint (as a kill would leave it):
    the set is still the one the manifest lists; copied again, the new set replaces it whole."""
    checkpoint = tmp_path / "ckpt"
    shutil.copytree(cached, checkpoint, symlinks=True)
    manifest = read_manifest(checkpoint)
    name = next(iter(manifest.caches))
    workspace = tmp_path / "workspace"
    for kind in KINDS:
        if (checkpoint / CACHES_DIR / name / kind).is_dir():
            shutil.copytree(checkpoint / CACHES_DIR / name / kind, workspace / kind)
    (workspace / "vllm" / "compiled-later.bin").write_bytes(b"new code")
    copied = []

    def copy_then_fail(src, dst):
        if len(copied) == 2:
            raise OSError("killed")
        copied.append(dst)
        return shutil.copyfile(src, dst)

    monkeypatch.setattr(start_caches.shutil, "copy2", copy_then_fail)
    with pytest.raises(OSError, match="killed"):
        start_caches.keep(workspace, checkpoint, manifest, name)
    monkeypatch.undo()
    assert start_caches.intact(checkpoint, read_manifest(checkpoint), name)
    assert [p.name for p in (checkpoint / CACHES_DIR).iterdir() if p.name.startswith(".")] != []  # verify names it
    manifest.caches[name] = start_caches.keep(workspace, checkpoint, manifest, name)
    assert f"{CACHES_DIR}/{name}/vllm/compiled-later.bin" in {e.path for e in manifest.caches[name]}
    assert start_caches.intact(checkpoint, manifest, name)
