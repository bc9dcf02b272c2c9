"""Checkpoints in S3 (presharded/s3.py), against a real S3 server: moto's
standalone server on 127.0.0.1, started here, reached over HTTP by boto3
through the standard AWS variables. A save uploads, a load reads the weights
in ranges from there with the same tokens as vLLM's own loader from the
source; what S3 refuses or answers wrongly is one line."""

import json
import os
import shutil
import socket
import subprocess
import sys

import pytest

from conftest import (BUCKET, PROMPT, moto_server, on_two_nodes, own_disks_possible, refused, run_script, script_env,
                      serving, with_snapshot)
from presharded import s3, server
from presharded.manifest import MANIFEST_NAME



def objects(prefix: str) -> dict[str, int]:
    import boto3

    listed = boto3.client("s3").list_objects_v2(Bucket=BUCKET, Prefix=prefix).get("Contents", [])
    return {o["Key"].removeprefix(prefix): o["Size"] for o in listed}


@pytest.fixture(scope="module")
def uploaded(tiny_model, s3_env) -> str:
    url = f"s3://{BUCKET}/tiny-tp1"
    proc = run_script("save_sharded_state.py", "--model", str(tiny_model), "--output", url, "--enforce-eager",
                      "--json", env=s3_env)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert json.loads(proc.stdout)["output"] == url
    return url


def load(url: str, env: dict, *flags: str) -> dict:
    proc = run_script("load_sharded_state.py", "--model", url, "--prompt", PROMPT, "--max-tokens", "24",
                      "--enforce-eager", "--json", *flags, env=env)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return json.loads(proc.stdout)


def test_a_save_uploads_every_file_and_the_manifest_with_their_etags(uploaded):
    import boto3

    listed = objects("tiny-tp1/")
    manifest = json.loads(boto3.client("s3").get_object(Bucket=BUCKET, Key=f"tiny-tp1/{MANIFEST_NAME}")["Body"].read())
    paths = [s["path"] for s in manifest["shards"]] + [f["path"] for f in manifest["files"]]
    assert set(listed) == {*paths, MANIFEST_NAME} and set(manifest["etags"]) == set(paths)


def test_a_load_from_s3_gives_the_sources_tokens(uploaded, s3_env, reference_tokens):
    out = load(uploaded, s3_env, "--verify-hashes", "--snapshot")  # no snapshot there: started as usual
    assert out["load_format"] == "fast_sharded_state" and out["token_ids"] == reference_tokens(1, 1)
    assert out["snapshot"]["used"] is False and out["snapshot"]["reason"].startswith(f"{uploaded} has no engine snapshot")


RUNAI = """
import json, sys
from vllm import LLM, SamplingParams
llm = LLM(model=sys.argv[1], load_format="runai_streamer_sharded", enforce_eager=True, max_model_len=256)
out = llm.generate([sys.argv[2]], SamplingParams(max_tokens=24, temperature=0), use_tqdm=False)
print(json.dumps(list(out[0].outputs[0].token_ids)))
"""


def test_vllms_runai_streamer_sharded_reads_our_s3_checkpoint(uploaded, s3_env, reference_tokens):
    """vLLM's own reader of sharded checkpoints in object storage (Run:ai's model streamer), on our upload:
    our files are named and laid out as vLLM's sharded_state, so it loads them as they are."""
    proc = subprocess.run([sys.executable, "-c", RUNAI, uploaded, PROMPT], capture_output=True, text=True,
                          timeout=300, env={**script_env(1), **s3_env, "VLLM_CPU_KVCACHE_SPACE": "1"})
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert json.loads(proc.stdout.splitlines()[-1]) == reference_tokens(1, 1)


def test_presharded_serve_serves_an_s3_checkpoint(uploaded, s3_env, reference_tokens, tmp_path):
    """presharded-serve s3://: vLLM's OpenAI server on the checked local copy of the small files,
    the weights read from S3 by our loader; named by its URL."""
    with serving(uploaded, "--enforce-eager", env=s3_env, entry=server.SERVE) as complete:
        assert complete(uploaded, PROMPT)["token_ids"] == reference_tokens(1, 1)
    line = refused("presharded-serve of s3:// with another load format", "presharded.serve_cli", uploaded,
                   "--load-format", "runai_streamer_sharded")
    assert "vllm serve s3://" in line


def test_two_nodes_with_disks_of_their_own_each_upload_their_ranks(tiny_model, s3_env, tmp_path):
    """--nnodes 2, each node writing onto a disk of its own: node 1's workers upload its rank from there,
    the driver its own and the manifest last, with both ranks' ETags; nothing stays on either disk. (A load
    from S3 reads one rank's objects as another's: at TP=1 above.)"""
    if not own_disks_possible():
        pytest.skip("unshare -rm is not allowed here: no mount namespace to give each node a disk of its own")
    url = f"s3://{BUCKET}/tiny-tp2-two-nodes"
    disks, mount = (tmp_path / "disk0", tmp_path / "disk1"), s3.upload_folder(url).parent  # where a save writes first
    for folder in (*disks, mount):
        folder.mkdir(exist_ok=True)
    saved = on_two_nodes("save_sharded_state.py", "--model", str(tiny_model), "--output", url, "-tp", "2",
                         disks=disks, mount=mount)
    assert saved[0].stdout.strip() == url and f"the other nodes (1) uploaded 1 files of theirs to {url}" in saved[0].stderr
    manifest = json.loads(boto3_body(f"tiny-tp2-two-nodes/{MANIFEST_NAME}"))
    ranks = sorted(s["tp_rank"] for s in manifest["shards"])
    assert ranks == [0, 1] and set(manifest["etags"]) >= {s["path"] for s in manifest["shards"]}
    assert not [p for disk in disks for p in disk.rglob("*.safetensors")]
    proc = run_script("presharded.verify_cli", url, "--json", env=s3_env)  # each object as its node wrote it
    assert proc.returncode == 0 and json.loads(proc.stdout)["hashes_match"], proc.stderr[-2000:]


def boto3_body(key: str) -> bytes:
    import boto3

    return boto3.client("s3").get_object(Bucket=BUCKET, Key=key)["Body"].read()


def test_what_s3_refuses_is_one_line(uploaded, tiny_model, s3_env):
    line = refused("a load from a bucket that is not there", "load_sharded_state.py", "--model",
                   "s3://no-such-bucket/tiny")
    assert "no bucket 'no-such-bucket'" in line
    line = refused("a load from an S3 prefix without a checkpoint", "load_sharded_state.py", "--model",
                   f"s3://{BUCKET}/nothing-here")
    assert "nothing-here holds no checkpoint" in line
    line = refused("an S3 load with vLLM's sharded_state", "load_sharded_state.py", "--model", uploaded,
                   "--load-format", "sharded_state")
    assert "fast_sharded_state" in line
    line = refused("a save to an S3 prefix that holds objects", "save_sharded_state.py", "--model", str(tiny_model),
                   "--output", uploaded)
    assert "already holds objects" in line
    line = refused("--replace on s3://", "save_sharded_state.py", "--model", str(tiny_model), "--output",
                   f"s3://{BUCKET}/new", "--replace")
    assert "--replace is refused on s3://" in line
    line = refused("a save to a bucket that is not there", "save_sharded_state.py", "--model", str(tiny_model),
                   "--output", "s3://no-such-bucket/tiny")
    assert "no such bucket" in line


def test_a_refused_s3_manifest_leaves_nothing_behind(uploaded, s3_env):
    """A manifest that lists `x` and `x/y`, another of 100,000 empty files, one whose files are not
    there: one line each, and no folder of the fetch's left in the cache."""
    import boto3

    client = boto3.client("s3")
    raw = json.loads(boto3_body(f"tiny-tp1/{MANIFEST_NAME}"))
    cases = {"both": [{"path": "x", "size": 0, "blake3": "0" * 64}, {"path": "x/y", "size": 0, "blake3": "0" * 64}],
             "many": [{"path": f"e{i}", "size": 0, "blake3": "0" * 64} for i in range(100_000)],
             "changed": []}
    for prefix, extra in cases.items():
        client.put_object(Bucket=BUCKET, Key=f"{prefix}/{MANIFEST_NAME}",
                          Body=json.dumps({**raw, "files": raw["files"] + extra}).encode())
    assert "'x' is listed as a file and is the folder" in refused(
        "an S3 manifest listing a file and its folder", "load_sharded_state.py", "--model", f"s3://{BUCKET}/both")
    assert "more than the 50000" in refused(None, "load_sharded_state.py", "--model", f"s3://{BUCKET}/many")
    assert "NoSuchKey" in refused(None, "load_sharded_state.py", "--model", f"s3://{BUCKET}/changed")  # no files
    cache = s3.local_copy(uploaded).parent
    assert not [p for p in cache.iterdir() if p.name.startswith(".")], sorted(cache.iterdir())  # a fetch's own
    assert not [url for url in cases if s3.local_copy(f"s3://{BUCKET}/{url}").exists()]


def test_an_object_changed_since_its_manifest_is_never_read(uploaded, s3_env):
    """The same size, other bytes: its ETag differs from the manifest's."""
    import boto3

    client = boto3.client("s3")
    copy = "tiny-changed/"
    for key in objects("tiny-tp1/"):
        client.copy_object(Bucket=BUCKET, Key=copy + key, CopySource={"Bucket": BUCKET, "Key": f"tiny-tp1/{key}"})
    weights = next(k for k in objects(copy) if k.endswith(".safetensors"))
    data = bytearray(client.get_object(Bucket=BUCKET, Key=copy + weights)["Body"].read())
    data[-1] ^= 0xFF  # in the last tensor's bytes: its table stays as saved
    client.put_object(Bucket=BUCKET, Key=copy + weights, Body=bytes(data))
    line = refused("an S3 weight object changed since its manifest", "load_sharded_state.py", "--model",
                   f"s3://{BUCKET}/{copy}")
    assert weights in line and "not the object its manifest lists" in line


def test_every_read_is_of_the_object_the_manifest_lists(uploaded):
    """Each ranged GET carries the manifest's ETag (If-Match): an object changed after the checks
    is refused by the server mid-load, not read."""
    from presharded import s3
    from presharded.errors import UserError
    from presharded.manifest import read_manifest

    manifest = read_manifest(s3.fetch(uploaded))
    (obj,) = s3.objects(uploaded, manifest, [manifest.shards[0].path])
    assert len(obj.read(0, 8)) == 8
    stale = s3.S3Object(obj.url, obj.bucket, obj.key, obj.size, '"0123456789abcdef0123456789abcdef"')
    with pytest.raises(UserError, match="changed since its manifest"):
        stale.read(0, 8)


def test_a_server_that_is_gone_is_one_line(uploaded, s3_env, monkeypatch):
    from presharded import s3
    from presharded.errors import UserError
    from presharded.manifest import read_manifest

    manifest = read_manifest(s3.fetch(uploaded))
    (obj,) = s3.objects(uploaded, manifest, [manifest.shards[0].path])
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    monkeypatch.setenv("AWS_ENDPOINT_URL", f"http://127.0.0.1:{port}")  # nothing listens there
    monkeypatch.setattr(s3, "_clients", {})
    with pytest.raises(UserError, match="check AWS_ENDPOINT_URL and that the server is up"):
        obj.read(0, 8)


def test_inspect_and_verify_read_s3(uploaded, s3_env):
    proc = run_script("presharded.inspect_cli", uploaded, env=s3_env)
    assert proc.returncode == 0 and proc.stdout.startswith(uploaded), proc.stderr[-2000:]
    proc = run_script("presharded.verify_cli", uploaded, "--json", env=s3_env)
    assert proc.returncode == 0 and json.loads(proc.stdout)["hashes_match"], proc.stderr[-2000:]


def test_a_denied_request_is_one_line(s3_env):
    """A server that checks credentials (moto's, with its IAM on) and keys it does not know."""
    server, endpoint = moto_server(INITIAL_NO_AUTH_ACTION_COUNT="0")
    try:
        proc = run_script("load_sharded_state.py", "--model", f"s3://{BUCKET}/tiny-tp1",
                          env={**s3_env, "AWS_ENDPOINT_URL": endpoint})
    finally:
        server.terminate()
    assert proc.returncode == 1 and "Traceback" not in proc.stderr, proc.stderr[-2000:]
    assert proc.stderr.strip().splitlines()[-1].endswith("403 (Forbidden); check the credentials and the bucket's policy")


def test_a_server_that_dies_mid_read_is_one_line(monkeypatch):
    """A server that sends the first bytes of a range, then closes the connection."""
    import threading

    from presharded import s3
    from presharded.errors import UserError

    listener = socket.socket()
    listener.bind(("127.0.0.1", 0))
    listener.listen()

    def serve() -> None:
        conn, _ = listener.accept()
        conn.recv(65536)
        conn.sendall(b'HTTP/1.1 206 Partial Content\r\nContent-Length: 4096\r\nETag: "e"\r\n\r\n' + bytes(100))
        conn.close()

    threading.Thread(target=serve, daemon=True).start()
    monkeypatch.setenv("AWS_ENDPOINT_URL", f"http://127.0.0.1:{listener.getsockname()[1]}")
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", "test")
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "test")
    monkeypatch.setenv("AWS_DEFAULT_REGION", "us-east-1")
    monkeypatch.setattr(s3, "_clients", {})
    obj = s3.S3Object("s3://b/k", "b", "k", 4096, '"e"')
    with pytest.raises(UserError, match="the read broke off|the server ended the read"):
        obj.read_into(memoryview(bytearray(4096)), 0)
    listener.close()


def test_a_snapshot_streams_from_s3_into_memory_checked_as_it_arrives(checkpoints, s3_env, tmp_path, monkeypatch,
                                                                     capsys):
    """A node with nothing local: the set's image and compiled code stream from S3 into this user's
    private folders, hashed as they arrive, its kept weights into the small files' folder; every
    rule holds as for a folder: a set this user did not make runs only if trusted, an object changed
    after its manifest or missing is not used (one warning each, and nothing of it left in place)."""
    from presharded import snapshot_restore
    from presharded.manifest import read_manifest

    folder, kept = tmp_path / "ckpt", os.urandom(3 << 20)
    name = with_snapshot(checkpoints(1, 1), folder, kept=kept)
    url = f"s3://{BUCKET}/with-snapshot"
    s3.upload(folder, url)
    monkeypatch.setenv("XDG_STATE_HOME", str(tmp_path / "state"))  # no trust records
    (tmp_path / "bin").mkdir()
    (tmp_path / "bin" / "criu").write_text("#!/bin/sh\nexit 1\n")  # there (the restore itself is not run here)
    (tmp_path / "bin" / "criu").chmod(0o755)
    monkeypatch.setenv("PATH", f"{tmp_path / 'bin'}:{os.environ['PATH']}")
    monkeypatch.setattr(snapshot_restore, "IMAGES", tmp_path / "shm")
    monkeypatch.setattr(snapshot_restore, "WORKSPACE", tmp_path / "workspace")

    def ready(trust: bool = True):
        local = s3.fetch(url)
        manifest = read_manifest(local)
        status = snapshot_restore.Restore()
        result = snapshot_restore.ready_image(local, manifest, ["--enforce-eager"], trust, status, False, url)
        warnings = [line for line in capsys.readouterr().err.splitlines() if line.startswith("warning:")]
        return local, result, warnings

    local, result, warnings = ready()
    assert result is not None and warnings == [], warnings
    image, _ = result
    assert (image / "pages-1.img").read_bytes() == (folder / "snapshots" / name / "pages-1.img").read_bytes()
    assert (local / "snapshots" / name / "weights" / "rank-pp0-tp0.safetensors").read_bytes() == kept
    assert not [p for p in image.glob(".*") if p.name != ".checked"], "a temporary copy left"

    local, result, warnings = ready(trust=False)
    assert result is None and len(warnings) == 1 and "--trust-snapshot" in warnings[0], warnings

    import boto3

    client, key = boto3.client("s3"), f"with-snapshot/snapshots/{name}/pages-1.img"
    shutil.rmtree(tmp_path / "shm")
    client.put_object(Bucket=BUCKET, Key=key, Body=os.urandom(1 << 20))  # changed after the manifest
    local, result, warnings = ready()
    assert result is None and len(warnings) == 1 and "missing or damaged" in warnings[0] and url in warnings[0]
    assert not [p for p in (tmp_path / "shm").rglob("*") if p.is_file()], "a changed object left in place"
    client.delete_object(Bucket=BUCKET, Key=key)  # missing
    local, result, warnings = ready()
    assert result is None and len(warnings) == 1 and "missing or damaged" in warnings[0], warnings
