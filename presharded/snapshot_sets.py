"""What an engine snapshot's set is: named by what a restore must match (GPU
kind and driver, vLLM and torch versions, layout, the engine flags as given,
compared in one spelling), what it holds beside the image, and whether this
machine can make or restore one at all (CRIU, cuda-checkpoint, root). Found
without importing vLLM."""

import functools
import importlib.metadata
import json
import os
import shutil
import subprocess
import time
from pathlib import Path

import blake3

from presharded.errors import UserError
from presharded.flags import normalize
from presharded.manifest import SNAPSHOTS_DIR, Manifest
from presharded.workspace import WORKSPACE

TOOLS = ("criu", "unshare")  # and NVIDIA's cuda-checkpoint where there is a GPU
HINTS = {"criu": "CRIU 4.2 or later", "unshare": "util-linux", "cuda-checkpoint": "NVIDIA's, driver 570 or later"}
META = "snapshot.json"  # in a set: what made it (the Python, the engine flags, the seconds)
KEPT = "weights"  # in a set: per rank, what the checkpoint's files cannot give back (presharded/snapshot_weights.py)
SERVER = "server_"  # how a server snapshot's set name begins
COMPILED = "workspace"  # in a set: the compile caches the process used, put back in the workspace before a restore
# Proven on the GPU machine (dev/results/snapshot-probe-2026-12-01-h200): torch.distributed's store is an
# established TCP socket; there is no iptables to lock the network with.
CRIU_FLAGS = ["--shell-job", "--tcp-established", "--network-lock", "skip", "--ext-unix-sk", "--file-locks"]
# The process runs as init of a PID namespace of its own; its mounts are this machine's, external, bound
# again from the same paths at a restore (which then needs --root).
NAMESPACE_FLAGS = ["--ext-mount-map", "auto", "--enable-external-sharing", "--enable-external-masters"]
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


def is_kept(path: str, name: str) -> bool:
    """Whether a file of set `name` is of the weights kept beside the image (read by the restored
    engine from the checkpoint, not copied with the image)."""
    return path.startswith(f"{SNAPSHOTS_DIR}/{name}/{KEPT}/")


def tool(*args: str, log: Path | None = None) -> float:
    """Seconds that CRIU or cuda-checkpoint took; a UserError naming its log if it failed."""
    start = time.perf_counter()
    proc = subprocess.run(args, capture_output=True, text=True)
    if proc.returncode != 0:
        last = (proc.stderr.strip().splitlines() or ["no message"])[-1]
        raise UserError(f"{Path(args[0]).name} {args[1]} failed ({last})" + (f"; its log: {log}" if log else ""))
    return time.perf_counter() - start
