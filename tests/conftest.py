"""Shared fixtures: tiny models built offline, and the two scripts run as a
user runs them, in fresh processes, against real vLLM on CPU."""

import json
import os
import shutil
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path

import psutil
import pytest

from presharded import s3, server
from presharded.formats import FAST_FORMAT, SHARDED_STATE
from presharded.generate import greedy_tokens
from presharded.server import free_port  # noqa: F401 (the tests take it from here)
from presharded.manifest import CopiedFile, hash_file, read_manifest, write_manifest
from presharded.shutdown import unmapped_since
from presharded.snapshot_sets import compared_flags, set_name
from presharded.staging import staging_folders
from presharded.tiny_models import build_tiny_llama

ROOT = Path(__file__).resolve().parent.parent
PROMPT = "The quick brown fox"
# Every refusal the tests saw, for docs/refusals.md: `case -> message`.
REFUSALS: dict[str, str] = {}
# The suite runs as two lanes at once (pytest-xdist's `-n 2` in pyproject.toml), each a process that runs
# whole files one after another: most of a test's time is a script importing vLLM on one core while the
# other waits. The files that share the tiny model's TP=2 checkpoint and reference tokens (session
# fixtures, made once per lane) are in lane "a", with others chosen by their times one test at a time so
# that the two lanes take about as long.
LANE_A = {"test_round_trip.py", "test_fast_loader.py", "test_verify.py", "test_s3.py", "test_snapshot.py",
          "test_nodes.py", "test_bench.py"}


@pytest.hookimpl(tryfirst=True, optionalhook=True)
def pytest_xdist_make_scheduler(config, log):
    from xdist.scheduler import LoadScopeScheduling

    class Lanes(LoadScopeScheduling):  # (xdist's own grouping by mark, loadgroup, does nothing on pytest 9.2)
        def _split_scope(self, nodeid: str) -> str:
            return "a" if Path(nodeid.split("::")[0]).name in LANE_A else "b"

    return Lanes(config, log)


def script_env(world_size: int = 1, engine_process: bool = False) -> dict[str, str]:
    """The environment of a script a test runs. Its engine core runs in the script's own process
    (VLLM_ENABLE_V1_MULTIPROCESSING=0: 2 s to start at TP=1, not 15; 7 s less at TP=2, whose workers
    are processes of their own either way) unless the test is about that process (`engine_process`)."""
    # On vLLM's CPU build an engine's workers do not exit within vLLM's 5 s grace at shutdown (they get
    # SIGTERM after it): 1 s spares 4-8 s per multi-process engine, once the work is done.
    env = dict(os.environ, VLLM_LOGGING_LEVEL="WARNING", VLLM_WORKER_SHUTDOWN_TIMEOUT_SECONDS="1")
    if not engine_process:
        env["VLLM_ENABLE_V1_MULTIPROCESSING"] = "0"
    return env


def run_script(script: str, *args: str, world_size: int = 1, timeout: float = 300,
               env: dict[str, str] | None = None, engine_process: bool = False) -> subprocess.CompletedProcess:
    """A root script (`save_sharded_state.py`) or a module (`presharded.verify_cli`), run as a user runs it."""
    cmd = [sys.executable, str(ROOT / script)] if script.endswith(".py") else [sys.executable, "-m", script]
    return subprocess.run([*cmd, *args], cwd=ROOT, env={**script_env(world_size, engine_process), **(env or {})},
                          capture_output=True, text=True, timeout=timeout)


def refused(case: str | None, script: str, *args: str, within: float | None = 5.0, unchanged: Path | None = None,
            world_size: int = 1, env: dict[str, str] | None = None, engine_process: bool = False) -> str:
    """Run a bad input; assert exit 1, nothing on stdout, one `error:` line and
    no traceback, in time, and that the folder `unchanged` is. Returns the line,
    kept for docs/refusals.md under `case` (if one is given)."""
    before = snapshot(unchanged) if unchanged else None
    start = time.perf_counter()
    proc = run_script(script, *args, world_size=world_size, env=env, engine_process=engine_process)
    elapsed = time.perf_counter() - start
    if unchanged:
        assert snapshot(unchanged) == before
    assert proc.returncode == 1, proc.stderr[-3000:]
    assert proc.stdout == ""
    assert "Traceback" not in proc.stderr, proc.stderr[-3000:]
    lines = proc.stderr.strip().splitlines()
    assert lines and lines[-1].startswith("error: "), proc.stderr[-3000:]
    if within is not None:
        assert len(lines) == 1, proc.stderr[-3000:]
        assert elapsed < within, f"refused only after {elapsed:.1f} s"
    if case:
        REFUSALS[case] = lines[-1]
    return lines[-1]


def outside(folder: Path) -> Path:
    """A copy of the checkpoint's first weight file outside it: what an attacker points at."""
    target = folder.parent / f"{folder.name}-outside"
    target.mkdir(exist_ok=True)
    shutil.copy(folder / "model-rank-0-part-0.safetensors", target)
    return target


def link_weight_out(folder: Path) -> None:
    target = outside(folder) / "model-rank-0-part-0.safetensors"
    (folder / "model-rank-0-part-0.safetensors").unlink()
    (folder / "model-rank-0-part-0.safetensors").symlink_to(target)


@contextmanager
def small_filesystem(where: Path, size: str, *options: str):
    """A real tmpfs of `size` mounted at `where` (this needs root, as CI has)."""
    if os.geteuid() != 0:
        pytest.skip("mounting a small filesystem needs root")
    where.mkdir(parents=True, exist_ok=True)
    subprocess.run(["mount", "-t", "tmpfs", "-o", ",".join([f"size={size}", *options]), "tmpfs", str(where)],
                   check=True)
    try:
        yield where
    finally:
        subprocess.run(["umount", str(where)], check=True)


def nothing_left(output: Path) -> None:
    assert not output.exists()
    assert staging_folders(output.resolve()) == []


def cmdline(proc: psutil.Process) -> str:
    """The command line of a process still running; "" for one that has ended (or is a zombie),
    which can happen between any two calls."""
    try:
        return " ".join(proc.cmdline()) if proc.is_running() and proc.status() != psutil.STATUS_ZOMBIE else ""
    except psutil.Error:
        return ""


def snapshot(folder: Path) -> dict[str, str]:
    """Every file under `folder` with its hash: to show that nothing was lost."""
    return {p.relative_to(folder).as_posix(): hash_file(p) for p in sorted(folder.rglob("*")) if p.is_file()}


def pytest_sessionfinish(session, exitstatus):
    if hasattr(session.config, "workeroutput"):  # a lane: its refusals go to the process that started it
        session.config.workeroutput["refusals"] = json.dumps(REFUSALS)
        return
    if REFUSALS:
        out = ROOT / "build" / "refusals.md"
        out.parent.mkdir(exist_ok=True)
        rows = [f"| {case} | `{line}` |" for case, line in REFUSALS.items()]
        out.write_text("| bad input | what it prints |\n| --- | --- |\n" + "\n".join(rows) + "\n")


@pytest.hookimpl(optionalhook=True)
def pytest_testnodedown(node, error):  # xdist: a lane ended
    REFUSALS.update(json.loads(node.workeroutput.get("refusals", "{}")))


def left_in_dev_shm(before: set[str], wait: float = 10.0) -> list[str]:
    """What vLLM's engines put in /dev/shm since `before` that no process maps, still there after `wait`
    seconds: left behind. (The other lane's engines map theirs; one of its engines that a test killed
    leaves its files until its script's guard removes them.)"""
    deadline = time.monotonic() + wait
    while True:
        left = sorted(path.name for path in unmapped_since(before, ("psm_", "vllm")))
        if not left or time.monotonic() > deadline:
            return left
        time.sleep(0.5)


@contextmanager
def serving(model: Path, *flags: str, env: dict[str, str] | None = None, entry: tuple[str, ...] = server.VLLM,
            log: Path | None = None) -> Iterator[Callable[[str, str], dict]]:
    """vLLM's OpenAI server on `model` (or `entry`'s: server.SERVE for presharded-serve), up; yields
    complete(served name, prompt) -> the greedy choice. Its stderr goes to `log` (a file, not a pipe
    that a talkative server could fill)."""
    env = dict(script_env(2, engine_process=True), VLLM_CPU_KVCACHE_SPACE="1", **(env or {}))
    with tempfile.TemporaryDirectory() as scratch:
        log = log or Path(scratch) / "server.log"
        with open(log, "w") as err, server.running(model, list(flags), env, timeout=240, stderr=err,
                                                   entry=entry) as (proc, port):
            assert port is not None, f"the server did not come up in 240 s:\n{log.read_text()[-3000:]}"

            def complete(name: str, prompt: str) -> dict:
                body = {"model": name, "prompt": prompt, "max_tokens": 24, "temperature": 0, "return_token_ids": True}
                return server.completion(port, body, timeout=60)["choices"][0]

            yield complete


def save(model: Path, output: Path, *flags: str, tp: int = 1, pp: int = 1) -> Path:
    proc = run_script("save_sharded_state.py", "--model", str(model), "--output", str(output),
                      "-tp", str(tp), "-pp", str(pp), *flags, world_size=tp * pp)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert proc.stdout.strip() == str(output.resolve())
    return output


def same_weights(a: Path, b: Path) -> bool:
    """Whether two TP=1 checkpoints hold the same tensors, whatever their parts."""
    from safetensors.torch import load_file

    x, y = ({k: v for f in sorted(c.glob("*.safetensors")) for k, v in load_file(f).items()} for c in (a, b))
    return x.keys() == y.keys() and all(x[k].equal(y[k]) for k in x)


def generate(model: Path, *flags: str, world_size: int = 1) -> dict:
    """Greedy tokens from load_sharded_state.py --json."""
    proc = run_script("load_sharded_state.py", "--model", str(model), "--prompt", PROMPT,
                      "--max-tokens", "24", "--enforce-eager", "--json", *flags, world_size=world_size)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return json.loads(proc.stdout)


@pytest.fixture(scope="session")
def tiny_model(tmp_path_factory) -> Path:
    return build_tiny_llama(tmp_path_factory.mktemp("models") / "tiny-llama")


@pytest.fixture(scope="session")
def tied_model(tmp_path_factory) -> Path:
    return build_tiny_llama(tmp_path_factory.mktemp("models") / "tiny-llama-tied", tie_word_embeddings=True)


@pytest.fixture(scope="session")
def reference_tokens(tiny_model, tp2_loads):
    """Greedy tokens of the source model loaded with load_format=auto, per (tp, pp)."""
    cache: dict[tuple[int, int], list[int]] = {}

    def tokens(tp: int = 1, pp: int = 1) -> list[int]:
        if (tp, pp) == (2, 1):
            return tp2_loads()["auto"]["token_ids"][0]
        if (tp, pp) not in cache:
            out = generate(tiny_model, "--load-format", "auto", "-tp", str(tp), "-pp", str(pp), world_size=tp * pp)
            cache[tp, pp] = out["token_ids"]
        return cache[tp, pp]

    return tokens


@pytest.fixture(scope="session")
def tp2_loads(tiny_model, checkpoints):
    """At TP=2, auto on the source and both formats on its TP=2 checkpoint, one engine after another in
    one process (a TP=2 engine's processes take 20 s to import vLLM here): each one's report, by format."""
    cache: dict[str, dict] = {}

    def loads() -> dict[str, dict]:
        if not cache:
            formats = ["auto", SHARDED_STATE, FAST_FORMAT]
            runs = [(tiny_model if f == "auto" else checkpoints(2, 1), f) for f in formats]
            results = greedy_tokens(runs, ["-tp", "2", "--enforce-eager", "--max-tokens", "24"], [PROMPT],
                                    env=script_env(2), timeout=600)
            cache.update(zip(formats, results))
        return cache

    return loads


@pytest.fixture(scope="session")
def checkpoints(tiny_model, tmp_path_factory):
    """Checkpoints of the tiny model, saved once per (tp, pp) and shared."""
    cache: dict[tuple[int, int], Path] = {}
    root = tmp_path_factory.mktemp("checkpoints")

    def checkpoint(tp: int = 1, pp: int = 1) -> Path:
        if (tp, pp) not in cache:
            cache[tp, pp] = save(tiny_model, root / f"tp{tp}-pp{pp}", tp=tp, pp=pp)
        return cache[tp, pp]

    return checkpoint


@pytest.fixture(scope="session")
def files_only(tiny_model, tmp_path_factory):
    """Checkpoints written without vLLM, for checks that only read files, per (tp, pp): each
    rank's file holds one small tensor, beside the tiny model's config and tokenizer and a set
    of start-up caches of one file (text, not compiled code)."""
    import torch

    from presharded.manifest import CopiedFile, Manifest, default_pattern, write_manifest
    from presharded.source_model import copy_model_files
    from presharded.writer import write_rank

    cache: dict[tuple[int, int], Path] = {}

    def checkpoint(tp: int = 2, pp: int = 1) -> Path:
        if (tp, pp) in cache:
            return cache[tp, pp]
        folder = tmp_path_factory.mktemp("files-only") / f"tp{tp}-pp{pp}"
        folder.mkdir()
        pattern = default_pattern(pp)
        shards = [s for stage in range(pp) for rank in range(tp)
                  for s in write_rank({"weight": torch.full((4,), float(rank))}, folder, pattern=pattern,
                                      pp_rank=stage, tp_rank=rank, max_file_size=None)]
        kernel = folder / "start-caches" / "S" / "inductor" / "kernel.py"
        kernel.parent.mkdir(parents=True)
        kernel.write_text("# compiled\n")
        entry = lambda path: CopiedFile(path, (folder / path).stat().st_size, hash_file(folder / path))  # noqa: E731
        write_manifest(folder, Manifest(
            vllm_version="none", tensor_parallel_size=tp, pipeline_parallel_size=pp, enable_expert_parallel=False,
            file_pattern=pattern, dtype="bfloat16", quantization=None, architecture="LlamaForCausalLM",
            source=str(tiny_model), created="2026-11-30T00:00:00+00:00", shards=shards,
            files=[entry(f) for f in copy_model_files(tiny_model, folder)],
            caches={"S": [entry(kernel.relative_to(folder).as_posix())]}))
        cache[tp, pp] = folder
        return folder

    return checkpoint


@pytest.fixture
def shared_tmp():
    """A folder like /tmp (root's, sticky, writable by all), given as TMPDIR: where workspaces go."""
    path = Path(tempfile.mkdtemp(dir="/tmp", prefix="presharded-test-"))
    path.chmod(0o1777)
    yield path
    shutil.rmtree(path, ignore_errors=True)


def own_disks_possible() -> bool:
    return subprocess.run(["unshare", "-rm", "true"], capture_output=True).returncode == 0


def on_two_nodes(script: str, *args: str, disks: tuple[Path, Path] | None = None, mount: Path | None = None,
                 timeout: float = 400) -> list[subprocess.CompletedProcess]:
    """Run `script` as node 0 and node 1 of one engine; with `disks`, each node
    sees its own disk at `mount`."""
    port = str(free_port())
    procs = []
    for node in (1, 0):  # the other node first: it waits for the driver
        cmd = [sys.executable, str(ROOT / script), *args, "--nnodes", "2", "--node-rank", str(node),
               "--master-addr", "127.0.0.1", "--master-port", port]
        if disks:
            cmd = ["unshare", "-rm", "sh", "-c", 'mount --bind "$0" "$1" && shift && exec "$@"',
                   str(disks[node]), str(mount), *cmd]
        procs.append(subprocess.Popen(cmd, cwd=ROOT, env=script_env(2, engine_process=True), stdout=subprocess.PIPE,
                                      stderr=subprocess.PIPE, text=True))
    results = []
    for proc in reversed(procs):  # node 0, node 1
        stdout, stderr = proc.communicate(timeout=timeout)
        results.append(subprocess.CompletedProcess(proc.args, proc.returncode, stdout, stderr))
    for node, result in enumerate(results):
        assert result.returncode == 0, "\n".join(f"node {n}:\n{r.stderr[-3000:]}" for n, r in enumerate(results))
    return results


BUCKET = "checkpoints"


def moto_server(**env: str) -> tuple[subprocess.Popen, str]:
    """moto's standalone S3 server on a free port of 127.0.0.1, up; its endpoint."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    proc = subprocess.Popen([os.path.join(os.path.dirname(sys.executable), "moto_server"), "-H", "127.0.0.1",
                             "-p", str(port)], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                            env={**os.environ, **env})
    for _ in range(200):
        try:
            socket.create_connection(("127.0.0.1", port), timeout=0.1).close()
            break
        except OSError:
            time.sleep(0.05)
    return proc, f"http://127.0.0.1:{port}"


MOTO: dict[str, subprocess.Popen] = {}  # endpoint: its server


def bucket_at(endpoint: str) -> None:
    os.environ["AWS_ENDPOINT_URL"] = endpoint
    s3._clients.clear()  # one made for another server would still point there
    import boto3

    boto3.client("s3").create_bucket(Bucket=BUCKET)


@pytest.fixture(scope="module")
def s3_env(tmp_path_factory):
    """moto's S3 server, and the variables that point boto3 at it, for the scripts and for this process."""
    moto, endpoint = moto_server()
    MOTO[endpoint] = moto
    env = {"AWS_ENDPOINT_URL": endpoint, "AWS_ACCESS_KEY_ID": "test", "AWS_SECRET_ACCESS_KEY": "test",
           "AWS_DEFAULT_REGION": "us-east-1", "XDG_CACHE_HOME": str(tmp_path_factory.mktemp("cache"))}
    old = {k: os.environ.get(k) for k in env}
    os.environ.update(env)
    bucket_at(endpoint)
    yield env
    for each in MOTO.values():
        each.terminate()
        each.wait()
    MOTO.clear()
    s3._clients.clear()
    for k, v in old.items():
        os.environ.pop(k) if v is None else os.environ.__setitem__(k, v)


def s3_up(env: dict[str, str]) -> dict[str, str]:
    """`env` with its S3 server up, an empty one started if something ended it (an in-process restore
    ends every process under this one, as a load's does under the script)."""
    if MOTO[env["AWS_ENDPOINT_URL"]].poll() is not None:
        moto, env["AWS_ENDPOINT_URL"] = moto_server()
        MOTO[env["AWS_ENDPOINT_URL"]] = moto
        bucket_at(env["AWS_ENDPOINT_URL"])
    return env


def with_snapshot(checkpoint: Path, dest: Path, flags: tuple[str, ...] = ("--enforce-eager",),
                  python: str = sys.executable, server: bool = False, kept: bytes | None = None) -> str:
    """A copy of `checkpoint` at `dest` with a snapshot set (of the server if `server`) for this
    machine and `flags`, with `kept` as its kept weights if given; the set's name."""
    shutil.copytree(checkpoint, dest)
    name = set_name(compared_flags(list(flags), server), 1, 1, server)
    files = {"pages-1.img": os.urandom(1 << 20), "snapshot.json": json.dumps({"python": os.path.realpath(python)}),
             **({"weights/rank-pp0-tp0.safetensors": kept} if kept is not None else {})}
    manifest = read_manifest(dest)
    manifest.snapshots[name] = []
    for file, data in files.items():
        path = dest / "snapshots" / name / file
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(data) if isinstance(data, bytes) else path.write_text(data)
        manifest.snapshots[name].append(CopiedFile(path.relative_to(dest).as_posix(), path.stat().st_size,
                                                   hash_file(path)))
    write_manifest(dest, manifest)
    return name
