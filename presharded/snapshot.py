"""Engine snapshots shipped inside the checkpoint. `make` starts vLLM's engine
from the checkpoint in a process of its own (presharded/snapshot_engine.py),
lets it generate once and sleep (vLLM's sleep mode, level 2: the weights and
the KV cache freed), moves what is left on the GPU into the process with
NVIDIA's cuda-checkpoint and dumps the process with CRIU into
snapshots/SET/. presharded/snapshot_restore.py brings that process back
instead of starting vLLM: no import, no profiling, no CUDA graphs; it wakes,
reads its weights from the checkpoint with our loader and answers one
request. A server snapshot (`make(..., server=True)`,
presharded/snapshot_server.py) is vLLM's OpenAI-compatible server and its
engine core, a tree of processes, dumped before it binds a port. The process
runs as init of a PID namespace of its own, restored into a new one, so its
PIDs never collide. Without a GPU there is no sleep mode: the weights stay in
the image.

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

import functools
import importlib.metadata
import importlib.util
import json
import os
import shutil
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from datetime import datetime, timezone
from pathlib import Path
from typing import IO

import blake3

import presharded
from presharded.errors import UserError
from presharded.flags import normalize
from presharded.load_checks import checked_manifest
from presharded.manifest import SNAPSHOTS_DIR, CopiedFile, Manifest, hash_file, write_manifest
from presharded.workspace import open_lock, private_folder
from presharded.workspace import WORKSPACE, link_model, swap_in
from presharded.start_caches import KINDS, use_set
from presharded.processes import holds_gpu, kill_tree, mapped_inodes, ns_pid, tree
from presharded.trust import record

TOOLS = ("criu", "unshare")  # and NVIDIA's cuda-checkpoint where there is a GPU
HINTS = {"criu": "CRIU 4.2 or later", "unshare": "util-linux", "cuda-checkpoint": "NVIDIA's, driver 570 or later"}
# Proven on the GPU machine (dev/results/snapshot-probe-2026-12-01-h200): torch.distributed's store is an
# established TCP socket; there is no iptables to lock the network with.
CRIU_FLAGS = ["--shell-job", "--tcp-established", "--network-lock", "skip", "--ext-unix-sk", "--file-locks"]
# The process runs as init of a PID namespace of its own (with its own /proc, which CUDA needs, hence a mount
# namespace too), so a restore never needs the dumped PIDs free. Its mounts are this machine's: external,
# bound again from the same paths at a restore (which then needs --root).
NAMESPACE = ["unshare", "--pid", "--fork", "--mount-proc"]
NAMESPACE_FLAGS = ["--ext-mount-map", "auto", "--enable-external-sharing", "--enable-external-masters"]
# The unlinked shared files (unlink_shared_files) go into the image: vLLM's queues between ranks are a few
# hundred MB each, sparse, so only their data is kept.
SHARED_FILES = ["--ghost-limit", "4G", "--ghost-fiemap"]
META = "snapshot.json"
# The files of the inbox through which this command and the snapshotted engine talk: the engine says it
# is ready to be dumped; restored, it reads the request and says what it did (its output in ENGINE_LOG).
READY, REQUEST, DONE, ENGINE_LOG = "ready.json", "request.json", "done.json", "engine.log"
# What the engine asks of its workers (presharded/snapshot_worker.py), by name through collective_rpc.
ASLEEP, KEEP_WEIGHTS, RESTORED, REFILL = "presharded_asleep", "presharded_keep", "presharded_restored", "presharded_refill"
KEEP = "keep.json"  # in the inbox while a snapshot is made: where the engine writes what it keeps (KEPT)
KEPT = "weights"  # in a set: per rank, what the checkpoint's files cannot give back (presharded/snapshot_weights.py)
SERVER = "server_"  # how a server snapshot's set name begins
COMPILED = "workspace"  # in a set: the compile caches the process used, put back in the workspace before a restore
SECRETS = ("TOKEN", "SECRET", "PASSWORD", "KEY", "CREDENTIAL")  # left out of the process, hence its image
# Flags of the server alone, given anew at each restore: the engine's flags must match the snapshot's.
SERVER_ONLY = {"--host", "--port", "--uds", "--api-key", "--served-model-name", "--root-path", "--ssl-keyfile",
               "--ssl-certfile", "--ssl-ca-certs", "--uvicorn-log-level", "--disable-uvicorn-access-log"}
IMAGES = Path("/dev/shm") if Path("/dev/shm").is_dir() else WORKSPACE.parent  # the checked copy: memory, no disk


def compared_flags(argv: list[str], server: bool = False) -> list[str]:
    """The engine flags as a snapshot compares them: in one spelling (`--a_b=c` as `--a-b c`); without
    --load-format (a restored engine reads its weights with fast_sharded_state), nor, for a server, its
    SERVER_ONLY flags."""
    flags = normalize(argv)
    while "--load-format" in flags:
        at = flags.index("--load-format")
        del flags[at:at + 2]
    if server:
        kept, dropping = [], False
        for arg in flags:
            dropping = arg in SERVER_ONLY or (dropping and not arg.startswith("-"))
            if not dropping:
                kept.append(arg)
        flags = kept
    return flags


@functools.cache  # nvidia-smi takes a while, and a restore's checks ask twice (the set's name, the tools)
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


def sleeps() -> bool:
    """Whether the snapshotted engine sleeps before the dump (vLLM's sleep mode, on NVIDIA GPUs only: the
    weights and the KV cache left out of the image). On a CPU they stay in it."""
    return gpu()[0] != "cpu"


def set_name(flags: list[str], tensor_parallel_size: int, pipeline_parallel_size: int,
             server: bool = False) -> str:
    """What a restore must match, as a folder name (found without importing vLLM)."""
    name, driver = gpu()
    digest = blake3.blake3(json.dumps(flags).encode()).hexdigest()[:12]
    text = (f"{SERVER if server else ''}vllm-{version('vllm')}_torch-{version('torch')}_{name}_driver-{driver}"
            f"_tp{tensor_parallel_size}-pp{pipeline_parallel_size}_flags-{digest}")
    return "".join(c if c.isalnum() or c in "._-" else "-" for c in text)[:200]


def unsupported(manifest: Manifest, nodes: int, flags: list[str]) -> str | None:
    """Why no snapshot can be made or restored here, if none can."""
    if "--worker-extension-cls" in flags:
        return "the snapshot's engine has a worker extension of its own (the methods a restore calls)"
    if manifest.pipeline_parallel_size * nodes > 1:
        return "pipeline stages and several nodes are not supported yet (tensor parallelism on one node is)"
    tools = TOOLS + (("cuda-checkpoint",) if sleeps() else ())
    if missing := [tool for tool in tools if shutil.which(tool) is None]:
        return f"{' and '.join(missing)} not found on PATH ({'; '.join(HINTS[tool] for tool in missing)})"
    if os.geteuid() != 0:
        return "CRIU needs root"
    return None


@contextmanager
def inbox(manifest: Manifest) -> Iterator[Path]:
    """WORKSPACE/ID/snapshot, emptied, for this process alone: one snapshot of the checkpoint is
    made or started at a time (the restored process finds its request at this one path)."""
    import fcntl

    root = private_folder(WORKSPACE)
    fd = open_lock(root / f"{manifest.id}.snapshot.lock")
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        box = private_folder(root / manifest.id / "snapshot")
        for old in box.iterdir():
            old.unlink()
        yield box
    finally:
        os.close(fd)


def is_kept(path: str, name: str) -> bool:
    """Whether a file of set `name` is of the weights kept beside the image (read by the restored
    engine from the checkpoint, not copied with the image)."""
    return path.startswith(f"{SNAPSHOTS_DIR}/{name}/{KEPT}/")


def rpc_folder() -> Path:
    """Where a server's engine sockets bind (VLLM_RPC_BASE_PATH): short (a socket's path holds 107
    bytes), this user's, emptied: a restore binds them again."""
    folder = private_folder(IMAGES / f"presharded-{os.getuid()}" / "rpc")
    for old in folder.iterdir():
        old.unlink()
    return folder


def own_session() -> None:
    """The snapshotted process, as init of its namespace, leads a session of its own: CRIU dumps
    no session whose leader is outside the namespace."""
    if os.getpid() == 1:
        os.setsid()


def redirect(log: str | None) -> None:
    """This process's standard input and output to /dev/null (nothing of this machine's terminal or
    pipes goes into the image), or, restored, its output to `log`."""
    fd = os.open(log, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o600) if log else os.open(os.devnull, os.O_RDWR)
    for target in (0, 1, 2) if log is None else (1, 2):
        os.dup2(fd, target)
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


def snapshot_env(extra: dict[str, str], server: bool) -> dict[str, str]:
    """The snapshotted process's environment: its image keeps it, so no secrets."""
    env = {k: v for k, v in os.environ.items() if not any(word in k.upper() for word in SECRETS)}
    package = str(Path(presharded.__path__[0]).resolve().parent)  # it runs from / (a folder every node has)
    path = os.pathsep.join([package, *filter(None, [env.get("PYTHONPATH")])])
    # A server's engine core is a child: spawned, since a forked one keeps the server's own NVIDIA device
    # files open, which cuda-checkpoint does not release (the child's are not its own) and CRIU cannot dump.
    engine = {"VLLM_WORKER_MULTIPROC_METHOD": "spawn"} if server else {"VLLM_ENABLE_V1_MULTIPROCESSING": "0"}
    return {**env, **extra, **engine, "PYTHONPATH": path, "PYTHONUNBUFFERED": "1"}


def unlink_shared_files(pids: list[int]) -> None:
    """The files in /dev/shm that the processes map (joblib's loky leaves a named semaphore there; vLLM's
    message queues between ranks are shared memory there): unlinked, so that CRIU keeps them in the
    image; a restore on another node would find no file of that name."""
    inodes = mapped_inodes(pids)
    for shared in Path("/dev/shm").iterdir():
        try:
            if shared.is_file() and shared.stat().st_ino in inodes:
                shared.unlink()
        except OSError:
            continue


def echo(stream: IO[bytes], quiet: threading.Event) -> None:
    """The snapshotted process's output on this one's stderr until `quiet` (then drained: unshare says
    that its child was killed by the dump)."""
    for line in stream:
        if not quiet.is_set():
            sys.stderr.buffer.write(line)
            sys.stderr.flush()


def make(checkpoint: Path, argv: list[str], trust_caches: bool = False, server: bool = False) -> tuple[str, dict]:
    """The verb of presharded-snapshot: a snapshot of an engine (or of vLLM's server) started on
    `checkpoint` with the flags `argv`, added to the checkpoint; its name and what it took."""
    manifest = checked_manifest(checkpoint)
    flags = compared_flags(argv, server)
    if problem := unsupported(manifest, 1, flags):
        raise UserError(f"cannot snapshot {checkpoint}: {problem}")
    uring = Path("/proc/sys/kernel/io_uring_disabled")
    if uring.exists() and uring.read_text().strip() != "2":
        raise UserError("CRIU cannot dump the io_uring that the engine opens: run "
                        "`sysctl kernel.io_uring_disabled=2` first")
    name = set_name(flags, manifest.tensor_parallel_size, manifest.pipeline_parallel_size, server)
    use_set(checkpoint, manifest, 1, 1, trust_caches)  # the start-up caches in the workspace if trusted: faster
    workspace = private_folder(WORKSPACE) / manifest.id
    link_model(workspace, checkpoint)
    caches = {var: str(workspace / kind) for kind, var in KINDS.items()}  # whatever it compiles: kept with the image
    new = checkpoint / SNAPSHOTS_DIR / f".{name}.new-{os.getpid()}"
    module = "presharded.snapshot_server" if server else "presharded.snapshot_engine"
    seconds: dict[str, float] = {}
    with inbox(manifest) as box:
        (new / KEPT).mkdir(parents=True)
        put(box / KEEP, {"folder": str(new / KEPT), "kept_as": f"{SNAPSHOTS_DIR}/{name}/{KEPT}"})
        cmd = [*NAMESPACE, sys.executable, "-m", module, str(box), "--model", str(workspace / "model"), *flags]
        print(f"starting vLLM on {checkpoint} for the snapshot {name}", file=sys.stderr, flush=True)
        env = snapshot_env({**caches, "VLLM_RPC_BASE_PATH": str(rpc_folder())}, server)
        # Pipes, not this process's own files: a file opened outside the namespace is on a mount that
        # CRIU cannot find inside it (and every process vLLM starts inherits them).
        proc = subprocess.Popen(cmd, env=env, stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                                stderr=subprocess.STDOUT, start_new_session=True, cwd="/")
        proc.stdin.close()
        quiet = threading.Event()
        threading.Thread(target=echo, args=(proc.stdout, quiet), daemon=True).start()
        try:
            ready = wait_for(box / READY, lambda: proc.poll() is None, 3600, "vLLM for the snapshot")
            quiet.set()
            root = tree(proc.pid)[1]  # under unshare: init of the new namespace
            pids = tree(root)
            cuda = [pid for pid in pids if holds_gpu(pid)]
            cuda_inside = [ns_pid(pid) for pid in cuda]  # the PIDs a restore gives them again
            t = time.perf_counter()
            for pid in cuda:
                tool(shutil.which("cuda-checkpoint"), "--toggle", "--pid", str(pid))
            seconds["cuda_checkpoint"] = time.perf_counter() - t
            unlink_shared_files(pids)
            seconds["dump"] = tool(shutil.which("criu"), "dump", "-t", str(root), "-D", str(new), "-W", str(box),
                                   *CRIU_FLAGS, *NAMESPACE_FLAGS, *SHARED_FILES, "-o", "dump.log",
                                   log=box / "dump.log")
            proc.wait(timeout=60)
            if not any((new / KEPT).iterdir()):  # the checkpoint's files give back every weight
                (new / KEPT).rmdir()
            meta = {"name": name, "made": datetime.now(timezone.utc).isoformat(timespec="seconds"),
                    "engine_flags": flags, "python": os.path.realpath(sys.executable),
                    "vllm": importlib.util.find_spec("vllm").origin, "tokens": ready["tokens"],
                    "cuda_pids": cuda_inside, "asleep_gib": ready["asleep_gib"],
                    "kept_bytes": ready["kept_bytes"]}
            (new / META).write_text(json.dumps(meta, indent=1) + "\n")
            for kind in KINDS:  # the process maps what it compiled (Inductor's .so files): it must be there
                if (workspace / kind).is_dir():
                    shutil.copytree(workspace / kind, new / COMPILED / kind)
            files = sorted(p for p in new.rglob("*") if p.is_file())
            entries = [CopiedFile(f"{SNAPSHOTS_DIR}/{name}/{p.relative_to(new).as_posix()}", p.stat().st_size,
                                  hash_file(p)) for p in files]
            swap_in(new, checkpoint / SNAPSHOTS_DIR / name)
        except BaseException:
            kill_tree(proc.pid)
            shutil.rmtree(new, ignore_errors=True)
            raise
    manifest = checked_manifest(checkpoint)  # as it is now: caches may have been added
    manifest.snapshots[name] = entries
    write_manifest(checkpoint, manifest)
    record(name, entries, checkpoint, SNAPSHOTS_DIR)
    kept = sum(e.size for e in entries if is_kept(e.path, name))
    made = {"image_bytes": sum(e.size for e in entries) - kept, "kept_bytes": kept,
            "start_seconds": ready["start_seconds"], "asleep_gib": ready["asleep_gib"]}
    return name, {**made, **{k: round(v, 3) for k, v in seconds.items()}}
