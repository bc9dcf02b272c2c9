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

What a set is and where it may run: presharded/snapshot_sets.py; how the
command and the snapshotted process talk: presharded/snapshot_inbox.py."""

import importlib.util
import json
import os
import shutil
import subprocess
import sys
import threading
import time
from datetime import datetime, timezone
from pathlib import Path
from typing import IO

import presharded
from presharded.criu_pages import trim
from presharded.errors import UserError
from presharded.load_checks import checked_manifest
from presharded.manifest import SNAPSHOTS_DIR, CopiedFile, Manifest, hash_file, write_manifest
from presharded.snapshot_inbox import KEEP, READY, inbox, put, rpc_folder, wait_for
from presharded.snapshot_sets import (COMPILED, CRIU_FLAGS, KEPT, META, NAMESPACE_FLAGS, compared_flags, is_kept,
                                      set_name, tool, unsupported)
from presharded.workspace import WORKSPACE, link_model, private_folder, swap_in
from presharded.start_caches import KINDS, use_set
from presharded.processes import holds_gpu, kill_tree, mapped_inodes, mapped_pages, ns_pid, tree
from presharded.trust import record

# The process runs as init of a PID namespace of its own (with its own /proc, which CUDA needs, hence a mount
# namespace too), so a restore never needs the dumped PIDs free. Its mounts are this machine's: external,
# bound again from the same paths at a restore (which then needs --root).
NAMESPACE = ["unshare", "--pid", "--fork", "--mount-proc"]
# The unlinked shared files (unlink_shared_files) go into the image: vLLM's queues between ranks are a few
# hundred MB each, sparse, so only their data is kept.
SHARED_FILES = ["--ghost-limit", "4G", "--ghost-fiemap"]
SECRETS = ("TOKEN", "SECRET", "PASSWORD", "KEY", "CREDENTIAL")  # left out of the process, hence its image


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
    check_can_snapshot(checkpoint, manifest, flags)
    name = set_name(flags, manifest.tensor_parallel_size, manifest.pipeline_parallel_size, server)
    use_set(checkpoint, manifest, 1, 1, trust_caches)  # the start-up caches in the workspace if trusted: faster
    workspace = private_folder(WORKSPACE) / manifest.id
    link_model(workspace, checkpoint)
    new = checkpoint / SNAPSHOTS_DIR / f".{name}.new-{os.getpid()}"
    with inbox(manifest) as box:
        (new / KEPT).mkdir(parents=True)
        put(box / KEEP, {"folder": str(new / KEPT), "kept_as": f"{SNAPSHOTS_DIR}/{name}/{KEPT}"})
        print(f"starting vLLM on {checkpoint} for the snapshot {name}", file=sys.stderr, flush=True)
        proc, quiet = start_to_dump(box, workspace, flags, server)
        try:
            ready, cuda_pids, mapped, seconds = dump(proc, quiet, box, new)
            mapped = {path: parts for path, parts in mapped.items()  # the weights: the refill reads them
                      if not Path(path).is_relative_to(checkpoint.resolve())}
            t = time.perf_counter()
            entries = finish_set(new, name, flags, ready, cuda_pids, mapped, workspace)
            seconds["set"] = time.perf_counter() - t  # zero pages out, compiled code copied, every file hashed
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
            "start_seconds": ready["start_seconds"], "asleep_gib": ready["asleep_gib"],
            "mapped_bytes": sum(length for parts in mapped.values() for _, length in parts)}
    return name, {**made, **{k: round(v, 3) for k, v in seconds.items()}}


def check_can_snapshot(checkpoint: Path, manifest: Manifest, flags: list[str]) -> None:
    if problem := unsupported(manifest, 1, flags):
        raise UserError(f"cannot snapshot {checkpoint}: {problem}")
    uring = Path("/proc/sys/kernel/io_uring_disabled")
    if uring.exists() and uring.read_text().strip() != "2":
        raise UserError("CRIU cannot dump the io_uring that the engine opens: run "
                        "`sysctl kernel.io_uring_disabled=2` first")


def start_to_dump(box: Path, workspace: Path, flags: list[str], server: bool) -> tuple[subprocess.Popen, threading.Event]:
    """vLLM (or its server) started in a namespace of its own, on the workspace's link to the checkpoint, to
    fall asleep and say so in `box`; its output echoed until `quiet` is set."""
    module = "presharded.snapshot_server" if server else "presharded.snapshot_engine"
    cmd = [*NAMESPACE, sys.executable, "-m", module, str(box), "--model", str(workspace / "model"), *flags]
    caches = {var: str(workspace / kind) for kind, var in KINDS.items()}  # whatever it compiles: kept with the image
    env = snapshot_env({**caches, "VLLM_RPC_BASE_PATH": str(rpc_folder())}, server)
    # Pipes, not this process's own files: a file opened outside the namespace is on a mount that
    # CRIU cannot find inside it (and every process vLLM starts inherits them).
    proc = subprocess.Popen(cmd, env=env, stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, start_new_session=True, cwd="/")
    proc.stdin.close()
    quiet = threading.Event()
    threading.Thread(target=echo, args=(proc.stdout, quiet), daemon=True).start()
    return proc, quiet


def dump(proc: subprocess.Popen, quiet: threading.Event, box: Path,
         new: Path) -> tuple[dict, list[int], dict, dict]:
    """Once the engine is asleep: its CUDA state moved to host memory, then the whole process tree dumped
    by CRIU into `new`. What the engine said when ready, its CUDA processes' PIDs inside the namespace
    (a restore gives them again), the parts of files its mappings hold (a restore on a new node reads
    them ahead), and the seconds each step took."""
    ready = wait_for(box / READY, lambda: proc.poll() is None, 3600, "vLLM for the snapshot")
    quiet.set()
    root = tree(proc.pid)[1]  # under unshare: init of the new namespace
    pids = tree(root)
    cuda = [pid for pid in pids if holds_gpu(pid)]
    cuda_inside = [ns_pid(pid) for pid in cuda]  # while they run: a restore gives them these PIDs again
    seconds: dict[str, float] = {}
    t = time.perf_counter()
    for pid in cuda:
        tool(shutil.which("cuda-checkpoint"), "--toggle", "--pid", str(pid))
    seconds["cuda_checkpoint"] = time.perf_counter() - t
    mapped = mapped_pages(pids)
    unlink_shared_files(pids)
    seconds["dump"] = tool(shutil.which("criu"), "dump", "-t", str(root), "-D", str(new), "-W", str(box),
                           *CRIU_FLAGS, *NAMESPACE_FLAGS, *SHARED_FILES, "-o", "dump.log", log=box / "dump.log")
    proc.wait(timeout=60)
    return ready, cuda_inside, mapped, seconds


def finish_set(new: Path, name: str, flags: list[str], ready: dict, cuda_pids: list[int], mapped: dict,
               workspace: Path) -> list[CopiedFile]:
    """The set's description and what the engine compiled written beside the image; every file's entry."""
    if not any((new / KEPT).iterdir()):  # the checkpoint's files give back every weight
        (new / KEPT).rmdir()
    meta = {"name": name, "made": datetime.now(timezone.utc).isoformat(timespec="seconds"),
            "engine_flags": flags, "python": os.path.realpath(sys.executable),
            "vllm": importlib.util.find_spec("vllm").origin, "tokens": ready["tokens"],
            "cuda_pids": cuda_pids, "asleep_gib": ready["asleep_gib"], "kept_bytes": ready["kept_bytes"],
            "mapped_pages": mapped}
    (new / META).write_text(json.dumps(meta, indent=1) + "\n")
    trim(new)  # half a GPU engine's pages are zeros, which a restore need not read
    for kind in KINDS:  # the process maps what it compiled (Inductor's .so files): it must be there
        if (workspace / kind).is_dir():
            shutil.copytree(workspace / kind, new / COMPILED / kind)
    return [CopiedFile(f"{SNAPSHOTS_DIR}/{name}/{p.relative_to(new).as_posix()}", p.stat().st_size, hash_file(p))
            for p in sorted(p for p in new.rglob("*") if p.is_file())]

