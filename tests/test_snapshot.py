"""Engine snapshots (presharded/snapshot.py) around the restore: CI has no GPU
and no CRIU that runs on its kernel, so the restore itself is proven on the GPU
machine (dev/results/snapshot-*) and, where a CRIU 4.2+ runs, by the last test
here on the CPU. The others: a set's place in the manifest and verify, the
trust rules, a damaged image, another Python, missing tools and a CRIU that
fails, each one warning and a normal start with the same tokens;
presharded-snapshot's refusals, and a snapshot made with a real engine and a
`criu` that only writes an image and kills the tree. A set there is otherwise
made by hand, for this machine and these flags: its image is bytes, not a
process."""

import dataclasses
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import psutil
import pytest

from conftest import BUCKET, PROMPT, cmdline, generate, refused, run_script, s3_up, serving, with_snapshot
from presharded import s3, server, snapshot, snapshot_restore, snapshot_sets
from presharded.errors import UserError
from presharded.manifest import CopiedFile, hash_file, read_manifest, write_manifest
from presharded.snapshot_sets import compared_flags, set_name
from presharded.env import TRUST_SNAPSHOT_ENV
from presharded.trust import record

FLAGS = ["--enforce-eager"]  # conftest.generate's engine flags
REQUEST = {"prompt": PROMPT, "max_tokens": 24, "temperature": 0.0, "top_p": 1.0}


@pytest.fixture
def snapshotted(checkpoints, tmp_path, monkeypatch) -> Path:
    """A copy of the tiny TP=1 checkpoint with a set; this user's trust records empty; no tools on PATH."""
    monkeypatch.setenv("XDG_STATE_HOME", str(tmp_path / "state"))
    monkeypatch.delenv(TRUST_SNAPSHOT_ENV, raising=False)
    monkeypatch.setenv("PATH", os.path.dirname(sys.executable) + ":/usr/bin:/bin")
    with_snapshot(checkpoints(1, 1), tmp_path / "ckpt")
    return tmp_path / "ckpt"


def restore(folder: Path, capsys, flags: list[str] = FLAGS, trust: bool = False) -> tuple[dict, list[str]]:
    """snapshot.restore as a load calls it: what it reported, and its warning lines."""
    status = snapshot_restore.restore(folder, read_manifest(folder), flags, REQUEST, trust)
    assert status.output is None
    return status.report(), [line for line in capsys.readouterr().err.splitlines() if line.startswith("warning:")]


FAILS = "echo 'Error (criu/cr-restore.c:2417): no process to restore here' >&2\nexit 1\n"
# A process "restored" (its PID in --pidfile) that ends at once, before it answers: as a crashed engine.
ENDS = 'while [ "$1" != --pidfile ]; do shift; done\nsleep 0.3 &\necho $! > "$2"\n'


def fake_tools(folder: Path, criu: str = FAILS) -> str:
    """A `criu` (that fails as CRIU fails, unless told otherwise), and a `cuda-checkpoint` that does the
    same: a PATH with them first."""
    folder.mkdir()
    for tool, body in (("criu", criu), ("cuda-checkpoint", criu if criu == FAILS else "exit 0\n")):
        (folder / tool).write_text("#!/bin/sh\n" + body)
        (folder / tool).chmod(0o755)
    return f"{folder}:{os.environ['PATH']}"


def test_flags_compare_as_vllm_reads_them():
    assert compared_flags(["--max_model_len=64", "-tp", "1"]) == ["--max-model-len", "64", "-tp", "1"]
    assert compared_flags(["--load-format", "sharded_state", "--enforce-eager"]) == ["--enforce-eager"]
    assert set_name(["--enforce-eager"], 1, 1) != set_name(["--enforce-eager", "--max-model-len", "64"], 1, 1)
    served = ["--port", "8000", "--api-key=k", "--served-model-name", "a", "b", "--max-model-len", "64", "--host", "::"]
    assert compared_flags(served, server=True) == ["--max-model-len", "64"]
    assert set_name(["--max-model-len", "64"], 1, 1, server=True).startswith("server_")


def test_the_image_keeps_no_secrets(monkeypatch):
    monkeypatch.setenv("HF_TOKEN", "hf_x")
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "y")
    env = snapshot.snapshot_env({}, server=False)
    assert "HF_TOKEN" not in env and "AWS_SECRET_ACCESS_KEY" not in env and env["VLLM_ENABLE_V1_MULTIPROCESSING"] == "0"


def test_the_set_is_in_the_manifest_and_verified(snapshotted):
    proc = run_script("presharded.verify_cli", str(snapshotted), "--json")
    assert proc.returncode == 0 and json.loads(proc.stdout)["snapshot_files"] == 2, proc.stderr
    (name, entries), = read_manifest(snapshotted).snapshots.items()
    (snapshotted / entries[0].path).write_bytes(os.urandom(1 << 20))
    line = refused("an engine snapshot's image changed", "presharded.verify_cli", str(snapshotted))
    assert "does not match its hash" in line and name in line


@pytest.mark.parametrize("path", ["start-caches/x/vllm/a", "snapshots/other/pages-1.img", "snapshots/../x"])
def test_a_set_lists_only_its_own_folder(snapshotted, path):
    text = (snapshotted / "presharded.json").read_text()
    raw = json.loads(text)
    (name, entries), = raw["snapshots"].items()
    entries[0]["path"] = path
    (snapshotted / "presharded.json").write_text(json.dumps(raw))
    with pytest.raises(UserError):
        read_manifest(snapshotted)


def test_a_snapshot_runs_only_if_trusted(snapshotted, capsys):
    status, warnings = restore(snapshotted, capsys)
    assert len(warnings) == 1 and "did not make on this machine" in warnings[0] and "--trust-snapshot" in warnings[0]
    (name, entries), = read_manifest(snapshotted).snapshots.items()
    record(name, entries, snapshotted, "snapshots")  # made here by this user: trusted, on to the tools
    status, warnings = restore(snapshotted, capsys)
    assert len(warnings) == 1 and "not found on PATH" in warnings[0], warnings
    assert status["used"] is False and status["set"] == name
    assert status["huge_pages"] in {"always", "madvise", "never", "unknown"}  # the host's, in --json: it matters


def test_what_does_not_match_is_named(snapshotted, checkpoints, tmp_path, capsys):
    _, warnings = restore(snapshotted, capsys, flags=[*FLAGS, "--max-model-len", "64"])
    assert len(warnings) == 1 and "none for" in warnings[0] and "engine flags" in warnings[0]
    with_snapshot(checkpoints(1, 1), tmp_path / "other-python", python="/usr/bin/env")
    _, warnings = restore(tmp_path / "other-python", capsys, trust=True)
    assert len(warnings) == 1 and "made with /usr/bin/env" in warnings[0]


def test_a_damaged_image_is_not_restored(snapshotted, capsys):
    (name, entries), = read_manifest(snapshotted).snapshots.items()
    with open(snapshotted / entries[0].path, "r+b") as f:  # same size, other bytes
        f.write(b"\0" * 4096)
    status, warnings = restore(snapshotted, capsys, trust=True)
    assert len(warnings) == 1 and "missing or damaged" in warnings[0] and name in warnings[0]
    assert status["used"] is False


REFILL = """
import json, sys
from pathlib import Path
from vllm import LLM, SamplingParams
from presharded.snapshot_weights import held
from presharded.snapshot_worker import SNAPSHOT_WORKER

model, out, prompt = Path(sys.argv[1]), Path(sys.argv[2]), sys.argv[3]
llm = LLM(model=str(model), load_format="fast_sharded_state", worker_extension_cls=SNAPSHOT_WORKER,
          enforce_eager=True)
greedy = SamplingParams(max_tokens=24, temperature=0.0)
tokens = lambda: list(llm.generate([prompt], greedy, use_tqdm=False)[0].outputs[0].token_ids)

def scramble(worker):  # what sleep mode does to the weights' memory: anything may be there after the wake
    for t in held(worker.model_runner.get_model(), lambda address: True).values():
        t.fill_(0x5A)

result = {"before": tokens()}
result["kept"] = llm.collective_rpc("presharded_keep", args=(str(model / "kept"), "kept"))[0]
llm.collective_rpc(scramble)
result["scrambled"] = tokens()
llm.collective_rpc("presharded_restored", args=(str(out.with_suffix(".log")), True))
llm.collective_rpc("presharded_refill")
result["after"] = tokens()
if len(sys.argv) > 4:  # again, the checkpoint's weights read from S3 (a node with nothing local)
    for weights in model.glob("*.safetensors"):
        weights.rename(weights.with_suffix(".elsewhere"))
    llm.collective_rpc(scramble)
    llm.collective_rpc("presharded_restored", args=(str(out.with_suffix(".log")), True, json.loads(sys.argv[4])))
    llm.collective_rpc("presharded_refill")
    result["after_s3"] = tokens()
out.write_text(json.dumps(result))
"""


def test_an_engines_weights_come_back_as_planned(checkpoints, tmp_path, s3_env):
    """A snapshot's refill in a real engine (on the CPU: no sleep mode, no CRIU, so every storage the model
    holds counts as freed, its KV cache too): the worker plans what the checkpoint's file gives back and
    keeps the rest (the rotary cache, the attention scales, the KV cache), every one of those storages is
    overwritten as sleep leaves it (the tokens go wrong), and the refill brings back the tokens; again with
    the checkpoint's weights in S3, read with the AWS environment the restoring command passes on."""
    s3_env = s3_up(s3_env)
    folder = shutil.copytree(checkpoints(1, 1), tmp_path / "ckpt")
    url = f"s3://{BUCKET}/refill"
    write_manifest(folder, s3.upload(folder, url))  # with each object's ETag, as a fetch of it has it
    (folder / "kept").mkdir()
    out = tmp_path / "refill.json"
    aws = {k: v for k, v in s3_env.items() if k.startswith("AWS_")}
    engine_env = {k: v for k, v in os.environ.items() if not k.startswith("AWS_")}  # as in a snapshot's image
    proc = subprocess.run([sys.executable, "-c", REFILL, str(folder), str(out), PROMPT,
                           json.dumps({"url": url, "env": aws})], capture_output=True, text=True, timeout=300,
                          env={**engine_env, "VLLM_ENABLE_V1_MULTIPROCESSING": "0", "VLLM_CPU_KVCACHE_SPACE": "1"})
    log = out.with_suffix(".log")  # where the engine writes once "restored"
    assert proc.returncode == 0, proc.stderr[-3000:] + (log.read_text()[-3000:] if log.exists() else "")
    result = json.loads(out.read_text())
    assert result["scrambled"] != result["before"]
    assert result["after"] == result["before"] and result["after_s3"] == result["before"]
    assert result["kept"] > 0 and [p.name for p in (folder / "kept").iterdir()] == ["rank-pp0-tp0.safetensors"]


def test_kept_weights_are_read_from_the_checkpoint_and_checked(snapshotted, capsys):
    """A set's kept weights (what the checkpoint's files cannot give back, presharded/snapshot_weights.py)
    stay in the checkpoint, where the restored engine reads them: not copied into memory with the image.
    One of another size than the manifest's is one warning and a normal start."""
    manifest = read_manifest(snapshotted)
    (name, entries), = manifest.snapshots.items()
    kept = snapshotted / "snapshots" / name / snapshot_sets.KEPT / "rank-pp0-tp0.safetensors"
    kept.parent.mkdir()
    kept.write_bytes(os.urandom(1 << 16))
    entries.append(CopiedFile(kept.relative_to(snapshotted).as_posix(), kept.stat().st_size, hash_file(kept)))
    write_manifest(snapshotted, manifest)
    record(name, entries, snapshotted, "snapshots")
    summary = run_script("presharded.inspect_cli", str(snapshotted)).stdout
    assert f"  snapshot      {name} (image 0.00 GB, weights kept beside it 0.1 MB)" in summary, summary
    _, warnings = restore(snapshotted, capsys)
    assert len(warnings) == 1 and "not found on PATH" in warnings[0], warnings  # past the image's checks
    images = snapshot_sets.IMAGES / f"presharded-{os.getuid()}"
    copied = {p.name for p in images.rglob("*") if p.is_file()}
    assert "pages-1.img" in copied and kept.name not in copied
    kept.write_bytes(kept.read_bytes()[:-1])
    status, warnings = restore(snapshotted, capsys)
    assert len(warnings) == 1 and f"{snapshot_sets.KEPT}/{kept.name} are missing or not of the size" in warnings[0]
    assert status["used"] is False


@pytest.mark.skipif(os.geteuid() != 0, reason="a restore needs root: without it, it stops before CRIU")
def test_a_restored_engine_that_ends_before_answering_starts_vllm(snapshotted, tmp_path, capsys, monkeypatch):
    """The restore "succeeds" but the process ends at once (reaped by the time it is killed): one warning."""
    monkeypatch.setenv("PATH", fake_tools(tmp_path / "bin", criu=ENDS))
    status, warnings = restore(snapshotted, capsys, trust=True)
    assert len(warnings) == 1 and "the restored engine ended before it was ready" in warnings[0], warnings
    assert status["used"] is False


def test_a_failed_restore_starts_vllm_with_the_same_tokens(snapshotted, reference_tokens, tmp_path):
    """Trusted and intact, but CRIU fails (as on any machine it cannot restore on): one warning, then
    vLLM starts as usual and gives the source's tokens, as a start without --snapshot does."""
    proc = run_script("load_sharded_state.py", "--model", str(snapshotted), "--prompt", PROMPT, "--max-tokens", "24",
                      "--enforce-eager", "--json", "--snapshot", "--trust-snapshot",
                      env={"PATH": fake_tools(tmp_path / "bin")})
    assert proc.returncode == 0, proc.stderr[-3000:]
    warnings = [line for line in proc.stderr.splitlines() if line.startswith("warning:")]
    out = json.loads(proc.stdout)
    expected = "criu restore failed (Error (criu/cr-restore.c" if os.geteuid() == 0 else "CRIU needs root"
    assert len(warnings) == 1 and expected in warnings[0], proc.stderr[-3000:]
    assert out["snapshot"]["used"] is False and out["load_format"] == "sharded_state"
    assert out["token_ids"] == reference_tokens(1, 1)


def test_presharded_serve_falls_back_to_vllms_server(snapshotted, checkpoints, reference_tokens, tmp_path):
    """A server snapshot for this machine and these flags, trusted, but CRIU fails: one warning, then
    vLLM's server starts on the checkpoint with our loader and answers with a load's tokens (the test of
    vLLM's server through fast_sharded_state at TP=1; compiled, with the start-up caches: test_start_caches.py)."""
    served = tmp_path / "served"
    with_snapshot(checkpoints(1, 1), served, server=True)
    status = snapshot_restore.restore_server(snapshotted, read_manifest(snapshotted), FLAGS, True)
    assert not status.used and status.exit_code is None
    assert "has no server snapshot" in status.reason  # an engine's set is not a server's
    log = tmp_path / "serve.log"
    with serving(served, *FLAGS, "--trust-snapshot", env={"PATH": fake_tools(tmp_path / "bin")}, entry=server.SERVE,
                 log=log) as complete:
        choice = complete(str(served), PROMPT)
    warnings = [line for line in log.read_text().splitlines() if line.startswith("warning:")]
    expected = "criu restore failed (Error (criu/cr-restore.c" if os.geteuid() == 0 else "CRIU needs root"
    assert len(warnings) == 1 and expected in warnings[0], log.read_text()[-3000:]
    assert choice["token_ids"] == reference_tokens(1, 1)


# A dump as CRIU's ends: an image written, the process tree killed.
DUMPS = ('while [ "$1" != -t ]; do shift; done; pid=$2\nwhile [ "$1" != -D ]; do shift; done\n'
         'echo image > "$2/pages-1.img"\nkill -9 "$pid"\n')


@pytest.fixture
def io_uring_off():
    """kernel.io_uring_disabled=2 (what presharded-snapshot asks for) while the test runs; as it was after."""
    knob = Path("/proc/sys/kernel/io_uring_disabled")
    before = knob.read_text().strip() if knob.exists() else None
    try:
        if before is not None:
            knob.write_text("2")
    except OSError:
        pytest.skip("kernel.io_uring_disabled cannot be set here (not root)")
    yield
    if before is not None:
        knob.write_text(before)


def test_a_snapshot_is_made_in_a_namespace_and_kept_in_the_checkpoint(checkpoints, tmp_path, monkeypatch,
                                                                       io_uring_off, s3_env):
    """presharded-snapshot with a real engine and a `criu` that dumps as CRIU does (CI has none that runs):
    the engine runs as init of a PID namespace of its own, the set goes into the manifest with its
    files' hashes, verify passes, and nothing of the engine is left; with --upload, the checkpoint and
    its set are in S3 after, under a manifest that lists the set with every object's ETag."""
    if subprocess.run(["unshare", "--pid", "--fork", "--mount-proc", "true"], capture_output=True).returncode:
        pytest.skip("unshare --pid --mount-proc is not allowed here")
    monkeypatch.setenv("PATH", fake_tools(tmp_path / "bin", criu=DUMPS))
    monkeypatch.setenv("XDG_STATE_HOME", str(tmp_path / "state"))
    folder = shutil.copytree(checkpoints(1, 1), tmp_path / "ckpt")
    url, s3_env = f"s3://{BUCKET}/snapshotted", s3_up(s3_env)
    made = run_script("presharded.snapshot_cli", str(folder), *FLAGS, "--json", "--upload", url,
                      env={"VLLM_CPU_KVCACHE_SPACE": "1", **s3_env})
    assert made.returncode == 0, made.stderr[-3000:]
    name = json.loads(made.stdout)["snapshot"]
    assert json.loads(made.stdout)["uploaded"] == url
    uploaded = read_manifest(s3.fetch(url))
    assert uploaded.snapshots == read_manifest(folder).snapshots
    assert {e.path for e in uploaded.snapshots[name]} <= set(uploaded.etags)
    assert name == set_name(FLAGS, 1, 1) and "_cpu_" in name
    entries = {e.path for e in read_manifest(folder).snapshots[name]}
    assert {f"snapshots/{name}/pages-1.img", f"snapshots/{name}/snapshot.json"} <= entries
    meta = json.loads((folder / "snapshots" / name / "snapshot.json").read_text())
    assert meta["cuda_pids"] == [] and meta["engine_flags"] == FLAGS and len(meta["tokens"]) == 16
    assert [set(worker) for worker in meta["asleep_gib"]] == [{"rss", "anon"}]
    assert meta["asleep_gib"][0]["rss"] > meta["asleep_gib"][0]["anon"] > 0.1
    assert "(MainProcess pid=1)" in made.stderr  # vLLM's log, through the pipe: PID 1 of its namespace
    verified = run_script("presharded.verify_cli", str(folder), "--json")
    assert verified.returncode == 0 and json.loads(verified.stdout)["snapshot_files"] == len(entries), verified.stderr
    assert "sigprocmask" not in made.stderr  # unshare's word on its killed child, after the dump: not shown
    assert not [p for p in psutil.process_iter() if "presharded.snapshot_engine" in cmdline(p)]


def test_presharded_snapshot_refuses_what_it_cannot_do(checkpoints, tmp_path, monkeypatch):
    staged = dataclasses.replace(read_manifest(checkpoints(1, 1)), pipeline_parallel_size=2)
    assert "pipeline stages" in snapshot_sets.unsupported(staged, 1, [])
    assert "several nodes" in snapshot_sets.unsupported(read_manifest(checkpoints(2, 1)), 2, [])
    tp1 = checkpoints(1, 1)
    monkeypatch.setenv("PATH", os.path.dirname(sys.executable))  # no criu, wherever this runs
    line = refused("an engine snapshot without CRIU", "presharded.snapshot_cli", str(tp1), unchanged=tp1)
    assert "criu and unshare not found on PATH (CRIU 4.2 or later; util-linux)" in line


def criu_here() -> str | None:
    """Why no real snapshot can be made on this machine; None where one can (CRIU 4.2 or later runs)."""
    criu = shutil.which("criu")
    if criu is None or os.geteuid() != 0:
        return "no criu on PATH, or not root (CI's Debian 12 has none that runs on a 6.18 kernel)"
    if subprocess.run([criu, "check"], capture_output=True).returncode != 0:
        return "`criu check` fails here"
    return None


NO_CRIU = criu_here()


@pytest.mark.skipif(NO_CRIU is not None, reason=str(NO_CRIU))
def test_a_cpu_snapshot_restores_in_a_pid_namespace_of_its_own(checkpoints, tmp_path, io_uring_off):
    """Where CRIU runs: the engine (TP=1 and TP=2) and the server snapshotted on the CPU (no sleep mode
    there: the weights stay in the image), each restored as init of a PID namespace of its own (so the
    dumped PIDs need not be free: the server twice at once), giving a normal load's tokens."""
    folder = shutil.copytree(checkpoints(1, 1), tmp_path / "ckpt")
    expected = generate(folder)["token_ids"]
    for args in ([], ["--server"]):
        made = run_script("presharded.snapshot_cli", str(folder), *FLAGS, *args, "--json", world_size=1 + len(args),
                          env={"VLLM_CPU_KVCACHE_SPACE": "1"})
        assert made.returncode == 0, made.stderr[-3000:]
    out = generate(folder, "--snapshot")
    assert out["snapshot"]["used"] is True and out["token_ids"] == expected
    tp2 = shutil.copytree(checkpoints(2, 1), tmp_path / "tp2")  # two workers: a tree, and shared memory between
    made = run_script("presharded.snapshot_cli", str(tp2), *FLAGS, "--json", world_size=2,
                      env={"VLLM_CPU_KVCACHE_SPACE": "1"})
    assert made.returncode == 0, made.stderr[-3000:]
    out = generate(tp2, "--snapshot", world_size=2)
    assert out["snapshot"]["used"] is True and out["tensor_parallel_size"] == 2
    assert out["token_ids"] == generate(tp2, world_size=2)["token_ids"]
    logs = tmp_path / "serve-a.log", tmp_path / "serve-b.log"
    with serving(folder, *FLAGS, entry=server.SERVE, log=logs[0]) as complete:  # two restores of one image at once
        with serving(folder, *FLAGS, entry=server.SERVE, log=logs[1]) as other:
            assert complete(str(folder), PROMPT)["token_ids"] == other(str(folder), PROMPT)["token_ids"] == expected
    for log in logs:
        assert "Started server process [1]" in log.read_text()  # each init of its own namespace
        assert f"restored {snapshot_sets.SERVER}" in log.read_text()
