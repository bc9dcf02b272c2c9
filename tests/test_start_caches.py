"""Start-up caches inside the checkpoint: made by the save (or by
presharded-caches) from one start, used by a later start of a moved copy with
empty caches of its own (vLLM's CPU build compiles with Inductor), shared by
starts at the same time, left unused with a warning when damaged."""

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from conftest import PROMPT, ROOT, run_script, script_env, serving
from presharded import start_caches
from presharded.load_checks import cached_entries, check_for_load, check_hashes
from presharded.manifest import CACHES_DIR, hash_file, read_manifest, write_manifest
from presharded.workspace import WORKSPACE, stamp
from presharded.start_caches import KINDS, files_under
from presharded.env import TRUST_ENV
from presharded.trust import TRUST_FLAG


def user_caches(tmp_path, name: str = "user-caches") -> dict[str, str]:
    """Empty cache folders of the user's own, for one start."""
    shutil.rmtree(tmp_path / name, ignore_errors=True)
    return {"VLLM_CACHE_ROOT": str(tmp_path / name / "vllm"), "TORCHINDUCTOR_CACHE_DIR": str(tmp_path / name / "inductor")}


def start(model, tmp_path, *flags: str, env: dict[str, str] | None = None,
          caches: dict[str, str] | None = None) -> tuple[dict, str]:
    """A compiled start (no --enforce-eager) with empty user caches, or the user's `caches`."""
    proc = run_script("load_sharded_state.py", "--model", str(model), "--prompt", PROMPT, "--max-tokens", "24",
                      "--json", *flags, env={**(caches or user_caches(tmp_path)), **(env or {})})
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


@pytest.fixture(scope="module")
def own_caches(tmp_path_factory) -> dict[str, str]:
    """The user's own cache folders, kept across this module's starts that use no set: what they
    compile once is theirs (the tests of a set's use start with empty ones)."""
    return user_caches(tmp_path_factory.mktemp("own-caches"))


@pytest.fixture(scope="module")
def reference(cached, own_caches, tmp_path_factory) -> list[int]:
    """Greedy tokens of a compiled start without the checkpoint's caches: what every start here must give."""
    out, _ = start(cached, tmp_path_factory.mktemp("reference"), "--no-start-caches", caches=own_caches)
    assert out["caches"] == "none"
    return out["token_ids"]


def test_a_set_is_in_the_manifest(cached):
    manifest = read_manifest(cached)
    (name, entries), = manifest.caches.items()
    assert entries and all((cached / e.path).is_file() for e in entries)
    assert all(e.path.startswith(f"{CACHES_DIR}/{name}/") for e in entries)
    proc = run_script("presharded.verify_cli", str(cached))  # every file, the caches too, is in the manifest
    assert proc.returncode == 0, proc.stderr[-3000:]


def test_a_moved_copy_starts_from_the_caches(cached, reference, tmp_path):
    shutil.rmtree(WORKSPACE / read_manifest(cached).id, ignore_errors=True)  # a fresh node
    with_caches, log = start(cached, tmp_path, env={"TORCH_LOGS": "torch._inductor.codecache"})
    # vLLM's CPU build logs nothing of its compile cache; the compiler (Inductor) does
    assert "fx graph cache hit" in log and "fx graph cache miss" not in log, log[-3000:]
    assert not any(p.is_file() for p in (tmp_path / "user-caches").rglob("*"))  # the user's caches: untouched
    assert with_caches["caches"] == "hit" and with_caches["token_ids"] == reference


def test_a_damaged_set_is_left_unused(cached, reference, own_caches, tmp_path):
    damaged = tmp_path / "damaged"
    shutil.copytree(cached, damaged)
    entry = read_manifest(damaged).caches.popitem()[1][0]
    (damaged / entry.path).write_bytes(b"not what was compiled")
    shutil.rmtree(WORKSPACE / read_manifest(damaged).id, ignore_errors=True)  # a new node
    out, stderr = start(damaged, tmp_path, caches=own_caches)
    assert out["caches"] == "none" and out["token_ids"] == reference
    warnings = [line for line in stderr.splitlines() if line.startswith("warning:") and "start-up caches" in line]
    assert len(warnings) == 1 and "missing or damaged" in warnings[0]


def test_starts_at_the_same_time_share_the_set(cached, tmp_path):
    """Replicas of one checkpoint on one machine (one per GPU) share its caches' fixed place."""
    shutil.rmtree(WORKSPACE / read_manifest(cached).id, ignore_errors=True)
    cmd = [sys.executable, str(ROOT / "load_sharded_state.py"), "--model", str(cached), "--prompt", PROMPT,
           "--max-tokens", "24", "--json"]
    procs = [subprocess.Popen(cmd, cwd=ROOT, env={**script_env(1), **user_caches(tmp_path, f"user-{i}")},
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True) for i in range(2)]
    outs = [p.communicate(timeout=300) for p in procs]
    assert [p.returncode for p in procs] == [0, 0], outs[0][1][-2000:] + outs[1][1][-2000:]
    results = [json.loads(out) for out, _ in outs]
    assert [r["caches"] for r in results] == ["hit", "hit"]
    assert results[0]["token_ids"] == results[1]["token_ids"]


def test_vllm_serve_starts_from_the_set(cached, reference, tmp_path):
    """`presharded-caches --serve` adds what vLLM's server compiles (on GPUs its defaults differ from the
    load script's; on CPU they compile alike); `eval "$(presharded-caches --env CKPT)"`, then the server on
    $PRESHARDED_MODEL compiles nothing, its first request included."""
    served = shutil.copytree(cached, tmp_path / "served")
    workspace = WORKSPACE / read_manifest(served).id
    proc = run_script("presharded.caches_cli", "--serve", str(served), timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    (name, entries), = read_manifest(served).caches.items()  # the set grew (a set is added the save's way)
    assert proc.stdout.startswith(f"{served}: start-up caches {name} ({len(entries)} files")
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
    assert choice["token_ids"] == reference


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
        start_caches.store_set(workspace, checkpoint, name)
    monkeypatch.undo()
    check_hashes(checkpoint, cached_entries(check_for_load(checkpoint)))  # the set the manifest lists, intact
    assert [p.name for p in (checkpoint / CACHES_DIR).iterdir() if p.name.startswith(".")] != []  # verify names it
    manifest.caches[name] = start_caches.store_set(workspace, checkpoint, name)
    assert f"{CACHES_DIR}/{name}/vllm/compiled-later.bin" in {e.path for e in manifest.caches[name]}
    write_manifest(checkpoint, manifest)
    check_hashes(checkpoint, cached_entries(check_for_load(checkpoint)))


def planted(cached: Path, folder: Path, marker: Path) -> Path:
    """A copy whose set someone else edited, as an attacker who can write the checkpoint
    would: each compiled Python file first creates `marker`; the manifest's hashes match."""
    ckpt = shutil.copytree(cached, folder)
    manifest = read_manifest(ckpt)
    edited = [e for entries in manifest.caches.values() for e in entries if e.path.endswith(".py")]
    assert edited, "the set holds no Python file to plant code in"
    for entry in edited:
        path = ckpt / entry.path
        path.write_text(f"open({str(marker)!r}, 'w').close()\n" + path.read_text())
        entry.size, entry.blake3 = path.stat().st_size, hash_file(path)
    write_manifest(ckpt, manifest)
    return ckpt


def test_a_set_someone_else_edited_runs_only_when_trusted(cached, reference, own_caches, tmp_path):
    marker = tmp_path / "planted-code-ran"
    ckpt = planted(cached, tmp_path / "planted", marker)
    out, stderr = start(ckpt, tmp_path, caches=own_caches)
    assert out["caches"] == "untrusted" and out["token_ids"] == reference
    assert not marker.exists()
    warnings = [line for line in stderr.splitlines() if line.startswith("warning:")]
    assert len(warnings) == 1 and "did not make" in warnings[0] and TRUST_FLAG in warnings[0], warnings
    out, _ = start(ckpt, tmp_path, TRUST_FLAG)
    assert out["caches"] == "hit" and marker.exists()  # trusted, the planted code runs: the check above means something


def test_vllm_serve_uses_a_set_it_did_not_make_only_when_told(cached, tmp_path):
    ckpt = planted(cached, tmp_path / "planted", tmp_path / "planted-code-ran")
    exported = {}
    for trust in ("", "1"):
        proc = run_script("presharded.caches_cli", "--env", str(ckpt), env={TRUST_ENV: trust})
        assert proc.returncode == 0, proc.stderr[-3000:]
        exported[trust] = dict(line.removeprefix("export ").split("=", 1) for line in proc.stdout.splitlines())
    assert exported[""] == {"PRESHARDED_MODEL": str(ckpt)}  # the checkpoint itself, no caches
    assert exported["1"]["PRESHARDED_MODEL"] == str(WORKSPACE / read_manifest(ckpt).id / "model")
    assert set(KINDS.values()) <= set(exported["1"])


# Another user on the same machine: CI runs as root, and `setpriv` acts as others.
ATTACKER, NON_ROOT = 65534, 65533
as_root_only = pytest.mark.skipif(os.getuid() != 0 or not shutil.which("setpriv"),
                                  reason="acting as other users needs root and setpriv")


def as_user(uid: int, *cmd: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess:
    """`cmd` as user `uid`, who may read and search every folder (CAP_DAC_READ_SEARCH, to reach
    this Python under a private home) but owns nothing and writes only where anyone may."""
    setpriv = ["setpriv", f"--reuid={uid}", f"--regid={uid}", "--clear-groups",
               "--inh-caps=+dac_read_search", "--ambient-caps=+dac_read_search"]
    return subprocess.run([*setpriv, *cmd], cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)


def take_first(shared_tmp: Path, victim: int, attacker: int, ckpt: Path, victim_file: Path) -> Path:
    """What another user could do before the victim's first start: make the victim's workspace
    (writable by all) with the lock a symlink to a file of the victim's, the model a link to other
    weights and compiled code of their own in the caches."""
    workspace = shared_tmp / f"presharded-{victim}" / read_manifest(ckpt).id
    script = (f'mkdir -m 777 "{workspace.parent}" "{workspace}" && ln -s "{victim_file}" "{workspace}.lock" '
              f'&& ln -s /nonexistent/other-weights "{workspace}/model"')
    proc = as_user(attacker, "sh", "-c", script)
    assert proc.returncode == 0, proc.stderr
    name = next(iter(read_manifest(ckpt).caches))
    shutil.copytree(ckpt / CACHES_DIR / name / "inductor", workspace / "inductor")  # as if the attacker had
    subprocess.run(["chown", "-R", f"{attacker}:{attacker}", str(workspace / "inductor")], check=True)
    return workspace


@as_root_only
def test_a_user_who_is_not_root_starts_from_the_caches(cached, reference, tmp_path, shared_tmp):
    """Another user made this user's workspace first (writable by all, the lock a link to one of the
    victim's files, compiled code of their own inside): not used, one warning, nothing of theirs run and
    the victim's file untouched. Then the same user's own start from the caches: a check that refused
    every user but root would fail there."""
    ckpt = shutil.copytree(cached, shared_tmp / "ckpt")
    marker = shared_tmp / "planted-code-ran"
    evil = planted(cached, shared_tmp / "evil", marker)
    home = shared_tmp / "home"
    home.mkdir(mode=0o700)
    (home / "victims-file").write_text("precious")
    subprocess.run(["chown", "-R", f"{NON_ROOT}:{NON_ROOT}", str(home)], check=True)
    results = {}
    for attacked in (True, False):
        tmp = shared_tmp / f"tmp-{attacked}"
        tmp.mkdir(mode=0o1777)
        tmp.chmod(0o1777)
        if attacked:
            take_first(tmp, NON_ROOT, ATTACKER, evil, home / "victims-file")
        env = {**script_env(1), "HOME": str(home), "TMPDIR": str(tmp), **user_caches(home)}
        eager = ["--enforce-eager"] if attacked else []  # the refusal is what counts here; root's checks the tokens
        proc = as_user(NON_ROOT, sys.executable, str(ROOT / "load_sharded_state.py"), "--model", str(ckpt),
                       "--prompt", PROMPT, "--max-tokens", "24", "--json", TRUST_FLAG, *eager, env=env)
        assert proc.returncode == 0, proc.stderr[-3000:]
        results[attacked] = (json.loads(proc.stdout), proc.stderr)
    assert results[True][0]["caches"] == "none" and f"belongs to uid {ATTACKER}" in results[True][1]
    warnings = [line for line in results[True][1].splitlines() if line.startswith("warning:")]
    assert len(warnings) == 1, warnings
    assert not marker.exists() and (home / "victims-file").read_text() == "precious"
    assert results[False][0]["caches"] == "hit"
    assert results[False][0]["token_ids"] == reference


@as_root_only
@pytest.mark.parametrize("whose", ["attacker", "victim"])
def test_a_payload_planted_in_the_workspace_runs_only_if_the_victim_made_it(cached, own_caches, tmp_path, shared_tmp,
                                                                          whose):
    """Another user made the victim's workspace first and left in it a compiled file of the set's size
    with a payload, sealed as checked; the victim then fixed only the top folder's owner and mode, as
    an older warning advised. The start does not use the workspace (one warning: remove it). The
    control: the same plant, the victim's own all the way down, does run."""
    marker = tmp_path / "planted-code-ran"
    manifest = read_manifest(cached)
    (name, entries), = manifest.caches.items()
    entry = next(e for e in entries if e.path.endswith(".py"))
    text = (cached / entry.path).read_bytes()
    cut = text.index(b"def benchmark_compiled_module")  # run on import once put in place of the benchmark
    payload = text[:cut] + f"open({str(marker)!r}, 'w').close()\n".encode().ljust(len(text) - cut, b"#")
    top = shared_tmp / f"presharded-{os.getuid()}"
    relative = entry.path.removeprefix(f"{CACHES_DIR}/{name}/")
    target, sealed = top / manifest.id / relative, top / manifest.id / ".checked" / relative
    proc = as_user(ATTACKER, "sh", "-c", f'mkdir -m 777 -p "{target.parent}" "{sealed.parent}" && chmod 777 "{top}"')
    assert proc.returncode == 0, proc.stderr
    target.write_bytes(payload)
    os.chown(target, ATTACKER, ATTACKER)
    if whose == "victim":
        subprocess.run(["chown", "-R", f"{os.getuid()}:{os.getgid()}", str(top)], check=True)
        subprocess.run(["chmod", "-R", "go-w", str(top)], check=True)
    sealed.write_text(stamp(target.lstat(), entry))
    os.chown(sealed, *(2 * ([ATTACKER] if whose == "attacker" else [os.getuid()])))
    os.chown(top, os.getuid(), os.getgid())  # what the victim fixed
    top.chmod(0o700)
    out, stderr = start(cached, tmp_path, TRUST_FLAG, env={"TMPDIR": str(shared_tmp)}, caches=own_caches)
    warnings = [line for line in stderr.splitlines() if line.startswith("warning:")]
    if whose == "attacker":
        assert out["caches"] == "none" and not marker.exists()
        assert len(warnings) == 1 and f"belongs to uid {ATTACKER}" in warnings[0] and f"remove {top}" in warnings[0]
    else:
        assert marker.exists(), stderr[-3000:]  # the plant is live: a start that used it would run it
