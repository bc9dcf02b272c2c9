"""Engine snapshots shipped inside the checkpoint. `make` starts vLLM's engine
from the checkpoint in a process of its own (presharded/snapshot_engine.py),
lets it generate once and sleep (vLLM's sleep mode, level 2: the weights and
the KV cache freed), moves what is left on the GPU into the process with
NVIDIA's cuda-checkpoint and dumps the process with CRIU into
snapshots/SET/. `restore` brings that process back instead of starting
vLLM: no import, no profiling, no CUDA graphs; it wakes, reads its weights
from the checkpoint with our loader and answers one request.

A set is named by what a restore must match: GPU kind and driver, vLLM and
torch versions, layout and the engine flags as given. The process also maps
the Python environment, which must be at the same paths, and reaches the
checkpoint through this user's workspace link (presharded/start_caches.py),
so the checkpoint itself may be anywhere. A snapshot is a whole process: it
runs only if trusted (presharded/trust.py), from a copy in a folder of this
user's, hashed there. Anything that does not fit gives one warning, and the
caller starts vLLM as usual.

The script and the restored process talk through files in
WORKSPACE/ID/snapshot/ (the same path in every process of this user): the
request (prompt, sampling, where to log) is written before the restore, the
answer (tokens, seconds) by the process."""

import ctypes
import importlib.metadata
import importlib.util
import json
import os
import shutil
import subprocess
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path

import blake3

import presharded
from presharded.errors import UserError
from presharded.load_checks import check_checkpoint
from presharded.manifest import SNAPSHOTS_DIR, CopiedFile, Manifest, hash_file, write_manifest
from presharded.private import private_folder
from presharded.start_caches import KINDS, WORKSPACE, checkpoint_id, link_model, put_in_place, swap_in, use_set
from presharded.trust import TRUST_SNAPSHOT_ENV, TRUST_SNAPSHOT_FLAG, made_here, record, trusted_by_user

TOOLS = ("criu", "cuda-checkpoint")
# Proven on the GPU machine (dev/results/snapshot-probe-2026-12-01-h200): torch.distributed's store is an
# established TCP socket; there is no iptables to lock the network with.
CRIU_FLAGS = ["--shell-job", "--tcp-established", "--network-lock", "skip", "--ext-unix-sk", "--file-locks"]
META = "snapshot.json"
COMPILED = "workspace"  # in a set: the compile caches the process used, put back in the workspace before a restore
SECRETS = ("TOKEN", "SECRET", "PASSWORD", "KEY", "CREDENTIAL")  # left out of the process, hence its image
IMAGES = Path("/dev/shm") if Path("/dev/shm").is_dir() else WORKSPACE.parent  # the checked copy: memory, no disk


def engine_flags(argv: list[str]) -> list[str]:
    """The engine flags as a snapshot compares them: `--a_b=c` as `--a-b c`; without --load-format
    (a restored engine reads its weights with fast_sharded_state)."""
    flags: list[str] = []
    for arg in argv:
        if arg.startswith("--"):
            key, eq, value = arg.partition("=")
            flags += [key.replace("_", "-"), value] if eq else [key.replace("_", "-")]
        else:
            flags.append(arg)
    while "--load-format" in flags:
        at = flags.index("--load-format")
        del flags[at:at + 2]
    return flags


def gpu() -> tuple[str, str]:
    """This machine's first GPU and its driver, ("cpu", "none") without an NVIDIA GPU."""
    try:
        out = subprocess.run(["nvidia-smi", "--query-gpu=name,driver_version", "--format=csv,noheader"],
                             capture_output=True, text=True, timeout=30).stdout.splitlines()
        name, driver = (part.strip() for part in out[0].split(","))
        return name, driver
    except (OSError, subprocess.SubprocessError, IndexError, ValueError):
        return "cpu", "none"


def version(package: str) -> str:
    for distribution in (package, f"{package}-cpu"):
        try:
            return importlib.metadata.version(distribution)
        except importlib.metadata.PackageNotFoundError:
            continue
    return "none"


def set_name(flags: list[str], tensor_parallel_size: int, pipeline_parallel_size: int) -> str:
    """What a restore must match, as a folder name (found without importing vLLM)."""
    name, driver = gpu()
    digest = blake3.blake3(json.dumps(flags).encode()).hexdigest()[:12]
    text = (f"vllm-{version('vllm')}_torch-{version('torch')}_{name}_driver-{driver}"
            f"_tp{tensor_parallel_size}-pp{pipeline_parallel_size}_flags-{digest}")
    return "".join(c if c.isalnum() or c in "._-" else "-" for c in text)[:200]


def unsupported(manifest: Manifest, nodes: int) -> str | None:
    """Why no snapshot can be made or restored here, if none can."""
    if manifest.tensor_parallel_size * manifest.pipeline_parallel_size * nodes > 1:
        return "only one GPU (TP=1, PP=1, one node) is supported yet: every worker would be a process of its own"
    if manifest.quantization:
        return (f"its weights are quantized ({manifest.quantization}), repacked after loading, "
                "which a restored engine does not redo yet")
    if missing := [tool for tool in TOOLS if shutil.which(tool) is None]:
        return f"{' and '.join(missing)} not found on PATH (CRIU 4.2.1 or later; NVIDIA's cuda-checkpoint)"
    if os.geteuid() != 0:
        return "CRIU needs root"
    return None


@contextmanager
def inbox(manifest: Manifest) -> Iterator[Path]:
    """WORKSPACE/ID/snapshot, emptied, for this process alone: one snapshot is made
    or restored at a time (a restored process has the PIDs it was dumped with)."""
    import fcntl

    root = private_folder(WORKSPACE)
    fd = os.open(root / f"{checkpoint_id(manifest)}.snapshot.lock", os.O_RDWR | os.O_CREAT | os.O_NOFOLLOW, 0o600)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        box = private_folder(root / checkpoint_id(manifest) / "snapshot")
        for old in box.iterdir():
            old.unlink()
        yield box
    finally:
        os.close(fd)


def put(path: Path, data: dict) -> None:
    """`data` as JSON at `path`, in one step: a reader polling for it never sees half of it."""
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(json.dumps(data))
    os.replace(tmp, path)


def wait_for(path: Path, alive, timeout: float, what: str) -> dict:
    deadline = time.monotonic() + timeout
    while not path.exists():
        if not alive():
            raise UserError(f"{what} ended before it was ready (its messages are above)")
        if time.monotonic() > deadline:
            raise UserError(f"{what} was not ready within {timeout:.0f} s")
        time.sleep(0.005)
    return json.loads(path.read_text())


def tool(*args: str, log: Path | None = None) -> float:
    """Seconds that CRIU or cuda-checkpoint took; a UserError naming its log if it failed."""
    start = time.perf_counter()
    proc = subprocess.run(args, capture_output=True, text=True)
    if proc.returncode != 0:
        last = (proc.stderr.strip().splitlines() or ["no message"])[-1]
        raise UserError(f"{Path(args[0]).name} {args[1]} failed ({last})" + (f"; its log: {log}" if log else ""))
    return time.perf_counter() - start


def engine_env(extra: dict[str, str]) -> dict[str, str]:
    """The snapshotted process's environment: its image keeps it, so no secrets."""
    env = {k: v for k, v in os.environ.items() if not any(word in k.upper() for word in SECRETS)}
    package = str(Path(presharded.__path__[0]).resolve().parent)  # it runs from / (a folder every node has)
    path = os.pathsep.join([package, *filter(None, [env.get("PYTHONPATH")])])
    return {**env, **extra, "PYTHONPATH": path, "VLLM_ENABLE_V1_MULTIPROCESSING": "0", "PYTHONUNBUFFERED": "1"}


def make(checkpoint: Path, argv: list[str], trust_caches: bool = False) -> tuple[str, dict]:
    """The verb of presharded-snapshot: a snapshot of an engine started on `checkpoint` with the
    engine flags `argv`, added to the checkpoint; its name and what it took."""
    manifest = check_checkpoint(checkpoint, require_manifest=True)
    if problem := unsupported(manifest, 1):
        raise UserError(f"cannot snapshot {checkpoint}: {problem}")
    if gpu()[0] == "cpu":
        raise UserError("an engine snapshot needs an NVIDIA GPU: vLLM's sleep mode, which frees the weights and "
                        "the KV cache before the dump, exists only there")
    uring = Path("/proc/sys/kernel/io_uring_disabled")
    if uring.exists() and uring.read_text().strip() != "2":
        raise UserError("CRIU cannot dump the io_uring that the engine opens: run "
                        "`sysctl kernel.io_uring_disabled=2` first")
    name = set_name(engine_flags(argv), manifest.tensor_parallel_size, manifest.pipeline_parallel_size)
    use_set(checkpoint, manifest, 1, 1, trust_caches)  # the start-up caches in the workspace if trusted: faster
    workspace = private_folder(WORKSPACE) / checkpoint_id(manifest)
    link_model(workspace, checkpoint)
    caches = {var: str(workspace / kind) for kind, var in KINDS.items()}  # whatever it compiles: kept with the image
    new = checkpoint / SNAPSHOTS_DIR / f".{name}.new-{os.getpid()}"
    seconds: dict[str, float] = {}
    with inbox(manifest) as box:
        new.mkdir(parents=True)
        cmd = [sys.executable, "-m", "presharded.snapshot_engine", str(box), "--model", str(workspace / "model"),
               *argv]
        print(f"starting vLLM on {checkpoint} for the engine snapshot {name}", file=sys.stderr, flush=True)
        proc = subprocess.Popen(cmd, env=engine_env(caches), stdin=subprocess.DEVNULL, stdout=sys.stderr,
                                start_new_session=True, cwd="/")
        try:
            ready = wait_for(box / "ready.json", lambda: proc.poll() is None, 3600,
                             "vLLM's engine for the snapshot")
            seconds["cuda_checkpoint"] = tool(shutil.which("cuda-checkpoint"), "--toggle", "--pid", str(proc.pid))
            seconds["dump"] = tool(shutil.which("criu"), "dump", "-t", str(proc.pid), "-D", str(new), "-W", str(box),
                                   *CRIU_FLAGS, "-o", "dump.log", log=box / "dump.log")
            proc.wait(timeout=60)
            meta = {"name": name, "made": datetime.now(timezone.utc).isoformat(timespec="seconds"),
                    "engine_flags": engine_flags(argv), "python": os.path.realpath(sys.executable),
                    "vllm": importlib.util.find_spec("vllm").origin, "tokens": ready["tokens"],
                    "gpu_in_use_asleep_gib": ready["gpu_in_use_asleep_gib"]}
            (new / META).write_text(json.dumps(meta, indent=1) + "\n")
            for kind in KINDS:  # the process maps what it compiled (Inductor's .so files): it must be there
                if (workspace / kind).is_dir():
                    shutil.copytree(workspace / kind, new / COMPILED / kind)
            files = sorted(p for p in new.rglob("*") if p.is_file())
            entries = [CopiedFile(f"{SNAPSHOTS_DIR}/{name}/{p.relative_to(new).as_posix()}", p.stat().st_size,
                                  hash_file(p)) for p in files]
            swap_in(new, checkpoint / SNAPSHOTS_DIR / name)
        except BaseException:
            proc.kill()
            shutil.rmtree(new, ignore_errors=True)
            raise
    manifest = check_checkpoint(checkpoint, require_manifest=True)  # as it is now: caches may have been added
    manifest.snapshots[name] = entries
    write_manifest(checkpoint, manifest)
    record(name, entries, checkpoint, SNAPSHOTS_DIR)
    made = {"image_bytes": sum(e.size for e in entries), "start_seconds": ready["start_seconds"]}
    return name, {**made, **{k: round(v, 3) for k, v in seconds.items()}}


@dataclass
class Generated:
    """What a restored engine answered, as vLLM's output has it."""

    text: str
    token_ids: list[int]


def restore(checkpoint: Path, manifest: Manifest, argv: list[str], request: dict, trust: bool = False,
            status: dict | None = None) -> Generated | None:
    """The verb of `load_sharded_state.py --snapshot`: the checkpoint's snapshot for this machine and these
    engine flags, restored, asked `request`; None, with one warning, when it cannot be (the caller then
    starts vLLM). `status` receives what happened and every phase's seconds."""
    status = {} if status is None else status
    status.update(used=False, seconds={})
    seconds = status["seconds"]

    def skip(reason: str) -> None:
        print(f"warning: not restoring the engine snapshot: {reason}; starting vLLM instead", file=sys.stderr)
        status["reason"] = reason
        return None

    start = time.perf_counter()
    if not manifest.snapshots:
        return skip(f"{checkpoint} has none (presharded-snapshot makes one)")
    name = status["set"] = set_name(engine_flags(argv), manifest.tensor_parallel_size,
                                    manifest.pipeline_parallel_size)
    if name not in manifest.snapshots:
        return skip(f"{checkpoint} has {', '.join(sorted(manifest.snapshots))}, none for {name} "
                    "(this GPU, driver, vLLM, torch, layout and engine flags)")
    entries = manifest.snapshots[name]
    if not (trusted_by_user(trust, TRUST_SNAPSHOT_ENV) or made_here(name, entries, SNAPSHOTS_DIR)):
        return skip(f"{name} is a whole process that this user did not make on this machine; if you trust "
                    f"whoever made it, pass {TRUST_SNAPSHOT_FLAG} (or set {TRUST_SNAPSHOT_ENV}=1)")
    try:
        images = private_folder(IMAGES / f"presharded-{os.getuid()}")
    except UserError as e:
        return skip(str(e))
    image = images / f"snapshot-{blake3.blake3(name.encode()).hexdigest()[:16]}"
    for other in images.glob("snapshot-*"):  # one image at a time in memory
        if other != image:
            shutil.rmtree(other, ignore_errors=True)
    workspace = private_folder(WORKSPACE) / checkpoint_id(manifest)
    compiled = [e for e in entries if e.path.startswith(f"{SNAPSHOTS_DIR}/{name}/{COMPILED}/")]
    if not (put_in_place(image, checkpoint, name, [e for e in entries if e not in compiled], SNAPSHOTS_DIR,
                         "the engine snapshot")
            and put_in_place(workspace, checkpoint, COMPILED, compiled, f"{SNAPSHOTS_DIR}/{name}",
                             f"the engine snapshot {name}'s")):
        status["reason"] = "its image is missing or damaged"  # put_in_place warned
        return None
    if (made_with := made_by(image / META)) != os.path.realpath(sys.executable):
        return skip(f"it was made with {made_with}; this is {os.path.realpath(sys.executable)} "
                    "(the Python environment must be at the same paths)")
    if problem := unsupported(manifest, 1):
        return skip(problem)
    seconds["check"] = time.perf_counter() - start
    link_model(workspace, checkpoint)
    with inbox(manifest) as box:
        put(box / "request.json", {**request, "log": str(box / "engine.log")})
        become_subreaper()  # the restored process becomes this one's child: waited for, and killed with it
        pid = None
        try:
            t = time.perf_counter()
            tool(shutil.which("criu"), "restore", "-D", str(image), "-W", str(box), *CRIU_FLAGS, "-d",
                 "--pidfile", str(box / "restored.pid"), "-o", "restore.log", log=box / "restore.log")
            pid = int((box / "restored.pid").read_text())
            seconds["restore"] = time.perf_counter() - t
            seconds["cuda_restore"] = tool(shutil.which("cuda-checkpoint"), "--toggle", "--pid", str(pid))
            done = wait_for(box / "done.json", lambda: alive(pid), 600, "the restored engine")
        except UserError as e:
            if pid is not None:
                os.kill(pid, 9)
            return skip(str(e))
        except BaseException:
            if pid is not None:
                os.kill(pid, 9)
            raise
        reap(pid)
        relay(box / "engine.log")
    if "error" in done:
        if done.get("request"):
            raise UserError(f"{done['error']} (--prompt, --max-tokens, --max-model-len)")
        return skip(f"the restored engine failed: {done['error']} (its log is above)")
    seconds.update(done["seconds"])
    seconds["total"] = time.perf_counter() - start
    status.update(used=True, seconds={k: round(v, 3) for k, v in seconds.items()})
    return Generated(done["text"], done["token_ids"])


def made_by(meta: Path) -> str:
    """The Python that ran the snapshotted process, as its snapshot.json says."""
    try:
        return str(json.loads(meta.read_text())["python"])
    except (OSError, ValueError, KeyError, TypeError):
        return f"an unknown Python ({meta.name} is missing or unreadable)"


def become_subreaper() -> None:
    ctypes.CDLL(None, use_errno=True).prctl(36, 1, 0, 0, 0)  # PR_SET_CHILD_SUBREAPER


def alive(pid: int) -> bool:
    try:
        return os.waitpid(pid, os.WNOHANG) == (0, 0)
    except ChildProcessError:  # not our child: is it there at all
        try:
            os.kill(pid, 0)
            return True
        except ProcessLookupError:
            return False


def reap(pid: int) -> None:
    for _ in range(1000):
        if not alive(pid):
            return
        time.sleep(0.01)
    os.kill(pid, 9)


def relay(log: Path) -> None:
    if log.exists():
        sys.stderr.write(log.read_text(errors="replace"))
