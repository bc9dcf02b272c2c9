"""Start-up caches shipped inside the checkpoint: what vLLM, Inductor and
Triton compile when an engine starts, kept from one start and used by later
starts on any machine of the same kind, wherever the checkpoint lives.

vLLM's cache keys hash the model's path and compiled artifacts hold absolute
paths, so a set is made and used at fixed paths: the caches under
WORKSPACE/ID/{vllm,inductor,triton} and the model as the symlink
WORKSPACE/ID/model to the checkpoint. WORKSPACE is this user's own
(presharded/workspace.py): the same path on every machine for the same user.
A set is named by what the caches depend on (versions, device, layout);
inside it vLLM's own hash folders tell the engine flags apart. A set that
does not match, is damaged or is not trusted (presharded/trust.py) is left
unused: slower, never wrong. Its files are copied into the workspace and
hashed there, so what runs is what was checked."""

import json
import os
import shutil
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

from presharded.env import MODEL_ENV
from presharded.errors import UserError
from presharded.formats import FAST_FORMAT, SHARDED_STATE
from presharded.load_checks import checked_manifest
from presharded.manifest import CACHE_KINDS, CACHES_DIR, CopiedFile, Manifest, hash_file, write_manifest
from presharded.workspace import SEALS, counted, link_model, put_in_place, swap_in, workspace_locked
from presharded.env import TRUST_ENV
from presharded.trust import TRUST_FLAG, made_here, record, trusted_by_user

KINDS = dict(zip(CACHE_KINDS, ("VLLM_CACHE_ROOT", "TORCHINDUCTOR_CACHE_DIR", "TRITON_CACHE_DIR")))


def caches_set_name(tensor_parallel_size: int, pipeline_parallel_size: int) -> str:
    """What the caches depend on, as a folder name."""
    import torch
    import vllm

    from presharded.vllm_compat import device_kind

    try:
        import triton

        compiler = f"_triton-{triton.__version__}"
    except ImportError:
        compiler = ""
    name = f"vllm-{vllm.__version__}_torch-{torch.__version__}{compiler}_{device_kind()}"
    return f"{name}_tp{tensor_parallel_size}-pp{pipeline_parallel_size}".replace("+", "-")


def caches_env(workspace: Path) -> dict[str, str]:
    env = {var: str(workspace / kind) for kind, var in KINDS.items()}
    from presharded.vllm_compat import is_cpu

    if is_cpu():
        # vLLM 0.32's CPU build cannot load its own ahead-of-time artifact (dev/notebook.md, section 6);
        # without it the compiled code is Inductor's cache, which loads.
        env["VLLM_USE_AOT_COMPILE"] = "0"
    return env


def empty_workspace(workspace: Path, folder: Path) -> None:
    """The caches emptied, so that a start fills them with exactly what it compiles."""
    for kind in KINDS:
        shutil.rmtree(workspace / kind, ignore_errors=True)
        shutil.rmtree(workspace / SEALS / kind, ignore_errors=True)
    link_model(workspace, folder)


def files_under(folder: Path) -> set[str]:
    return {p.relative_to(folder).as_posix() for p in folder.rglob("*") if p.is_file()} if folder.exists() else set()


def store_set(workspace: Path, folder: Path, name: str) -> list[CopiedFile]:
    """The caches a start filled in `workspace`, as the set `name` of the checkpoint in `folder`.
    Copied beside the set first, then swapped in by renames: a kill while copying leaves the old set
    as the manifest lists it (and a hidden folder that verify names)."""
    dest = folder / CACHES_DIR / name
    new = dest.with_name(f".{name}.new-{os.getpid()}")
    entries = []
    files = [(kind, relative) for kind in KINDS for relative in sorted(files_under(workspace / kind))]
    for kind, relative in counted(files, f"copying the start-up caches {name} into the checkpoint"):
        target = new / kind / relative
        target.parent.mkdir(parents=True, exist_ok=True)
        shutil.copy2(workspace / kind / relative, target)
        path = (dest / kind / relative).relative_to(folder).as_posix()
        entries.append(CopiedFile(path, target.stat().st_size, hash_file(target)))
    new.mkdir(parents=True, exist_ok=True)  # a start that compiled nothing
    swap_in(new, dest)
    return entries


@dataclass
class CachesInUse:
    """How a start uses the checkpoint's caches: `model` and `env` for the engine."""

    status: str  # "none" (no matching set, or damaged), "untrusted"; "hit" or "miss" once the engine has started
    model: Path
    env: dict[str, str]
    workspace: Path | None = None
    before: frozenset[str] = frozenset()

    def finish(self) -> str:
        """After the engine has started: whether it compiled anything (new files) or used the set."""
        if self.workspace is not None:
            after = {f"{k}/{f}" for k in KINDS for f in files_under(self.workspace / k)}
            self.status = "miss" if after - self.before else "hit"
        return self.status


def use_set(folder: Path, manifest: Manifest | None, tensor_parallel_size: int, pipeline_parallel_size: int,
            trust: bool = False) -> CachesInUse:
    """The verb of a start: the set that matches this machine, if trusted, checked and put in place,
    with this process's cache folders pointed at it (the user's own are left alone); or a start
    without caches."""
    none = CachesInUse("none", folder, {})
    if manifest is None or not manifest.caches:
        return none
    name = caches_set_name(tensor_parallel_size, pipeline_parallel_size)
    if name not in manifest.caches:
        print(f"warning: {folder} has start-up caches for {', '.join(manifest.caches)}, none for {name}: "
              "starting without them", file=sys.stderr)
        return none
    if not trusted(folder, name, manifest.caches[name], trust, "starting without them"):
        return CachesInUse("untrusted", folder, {})
    try:
        with workspace_locked(manifest) as workspace:
            link_model(workspace, folder)
            if not put_in_place(workspace, folder, name, manifest.caches[name]):
                return none
            before = frozenset(f"{k}/{f}" for k in KINDS for f in files_under(workspace / k))
    except UserError as e:
        print(f"warning: {e}; starting without the start-up caches", file=sys.stderr)
        return none
    use = CachesInUse("none", workspace / "model", caches_env(workspace), workspace, before)
    os.environ.update(use.env)
    return use


def record_set(checkpoint: Path, engine_flags: list[str], serve: bool = False, trust: bool = False) -> str:
    """The verb of a save or presharded-caches: start vLLM once on `checkpoint` (with `serve`,
    vLLM's server) and keep what it compiled, beside the set it started from if that may run,
    as the set for this machine; record that this user made it. Its name."""
    manifest = checked_manifest(checkpoint)
    name = caches_set_name(manifest.tensor_parallel_size, manifest.pipeline_parallel_size)
    with workspace_locked(manifest) as workspace:  # loads of this checkpoint here wait for it
        empty_workspace(workspace, checkpoint)
        if name in manifest.caches and trusted(checkpoint, name, manifest.caches[name], trust,
                                               "it is replaced by what this start compiles"):
            put_in_place(workspace, checkpoint, name, manifest.caches[name])  # a set grows
        env = {**os.environ, **caches_env(workspace)}
        what = "vLLM's server" if serve else "vLLM"
        print(f"starting {what} on {checkpoint} to fill the start-up caches {name}", file=sys.stderr, flush=True)
        if serve:
            start_server(workspace / "model", [*checkpoint_flags(manifest), *engine_flags], env)
        else:
            start_to_compile(workspace / "model", engine_flags, env)
        manifest.caches[name] = store_set(workspace, checkpoint, name)
    write_manifest(checkpoint, manifest)
    try:
        record(name, manifest.caches[name], checkpoint)
    except UserError as e:
        print(f"warning: {e}; this set will need {TRUST_FLAG} to be used", file=sys.stderr)
    return name


def start_to_compile(model: Path, engine_flags: list[str], env: dict[str, str]) -> None:
    """vLLM on `model`, generating a few tokens: the first decode step may compile too."""
    cmd = [sys.executable, "-m", "presharded.generate", json.dumps([[str(model), SHARDED_STATE]]),
           "--max-tokens", "8", "--no-start-caches", *engine_flags]
    proc = subprocess.run(cmd, env=env, stdout=subprocess.DEVNULL)
    if proc.returncode != 0:
        raise UserError(f"vLLM did not start on {model.resolve()} (exit {proc.returncode}; its messages are above); "
                        "no start-up caches were added")


def checkpoint_flags(manifest: Manifest) -> list[str]:
    """What a load takes from the checkpoint by itself, for vLLM's server."""
    layout = manifest.engine_defaults()
    flags = ["--load-format", FAST_FORMAT, "--tensor-parallel-size", str(layout["tensor_parallel_size"]),
             "--pipeline-parallel-size", str(layout["pipeline_parallel_size"]), "--dtype", layout["dtype"]]
    if layout["enable_expert_parallel"]:
        flags.append("--enable-expert-parallel")
    if layout["quantization"]:
        flags += ["--quantization", layout["quantization"]]
    if "model_loader_extra_config" in layout:
        flags += ["--model-loader-extra-config", json.dumps(layout["model_loader_extra_config"])]
    return flags


def start_server(model: Path, engine_flags: list[str], env: dict[str, str]) -> None:
    """vLLM's OpenAI server on `model` until it answers one request: its defaults differ from
    `LLM`'s (fewer batched tokens), and so does what it compiles."""
    from presharded import server
    from presharded.vllm_compat import is_cpu

    if is_cpu():
        env = {"VLLM_CPU_KVCACHE_SPACE": "1", **env}  # GiB; else 90 % of RAM
    with server.running(model, engine_flags, env) as (proc, port):
        if port is None:
            raise UserError(f"vLLM's server did not start on {model.resolve()} (exit {proc.returncode}; "
                            "its messages are above); no start-up caches were added")
        server.completion(port, {"model": str(model), "prompt": "Hello", "max_tokens": 8})


def serving_env(checkpoint: Path, trust: bool = False) -> dict[str, str]:
    """The variables for a server started on $PRESHARDED_MODEL: the checkpoint through its
    caches' fixed place, or the checkpoint itself (with a warning) without a usable set."""
    manifest = checked_manifest(checkpoint)
    use = use_set(checkpoint, manifest, manifest.tensor_parallel_size, manifest.pipeline_parallel_size, trust)
    return {**use.env, MODEL_ENV: str(use.model.absolute())}


def trusted(folder: Path, name: str, entries: list[CopiedFile], trust: bool, otherwise: str) -> bool:
    """Whether the set may run: the user trusts it, or made it here; a warning if not."""
    if trusted_by_user(trust) or made_here(name, entries):
        return True
    print(f"warning: the start-up caches {name} in {folder} hold compiled code that this user did not make "
          f"on this machine: {otherwise}; if you trust whoever made them, pass {TRUST_FLAG} "
          f"(or set {TRUST_ENV}=1)", file=sys.stderr)
    return False


