"""Start-up caches shipped inside the checkpoint: what vLLM, Inductor and
Triton compile when an engine starts, kept from one start and used by later
starts on any machine of the same kind, wherever the checkpoint lives.

vLLM's cache keys hash the model's path and compiled artifacts hold absolute
paths, so a set is made and used at fixed paths: the caches under
WORKSPACE/ID/{vllm,inductor,triton} and the model as the symlink
WORKSPACE/ID/model to the checkpoint. WORKSPACE is this user's own
(presharded/private.py): the same path on every machine for the same user.
A set is named by what the caches depend on (versions, device, layout);
inside it vLLM's own hash folders tell the engine flags apart. A set that
does not match, is damaged or is not trusted (presharded/trust.py) is left
unused: slower, never wrong. Its files are copied into the workspace and
hashed there, so what runs is what was checked."""

import fcntl
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from stat import S_ISREG

from presharded.env import MODEL_ENV
from presharded.errors import UserError
from presharded.formats import FAST_FORMAT, SHARDED_STATE
from presharded.load_checks import checked_manifest
from presharded.manifest import CACHE_KINDS, CACHES_DIR, MANIFEST_NAME, CopiedFile, Manifest, hash_file, write_manifest
from presharded.private import open_lock, private_folder
from presharded.progress import bar
from presharded.env import TRUST_ENV
from presharded.trust import TRUST_FLAG, made_here, record, trusted_by_user

KINDS = dict(zip(CACHE_KINDS, ("VLLM_CACHE_ROOT", "TORCHINDUCTOR_CACHE_DIR", "TRITON_CACHE_DIR")))
WORKSPACE = Path(tempfile.gettempdir()) / f"presharded-{os.getuid()}"
SEALS = ".checked"  # in a workspace: which of its copies were hashed (put_in_place)


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


def checkpoint_id(manifest: Manifest) -> str:
    """The same for every copy of one checkpoint, wherever it is (Manifest.id)."""
    return manifest.id


def caches_env(workspace: Path) -> dict[str, str]:
    env = {var: str(workspace / kind) for kind, var in KINDS.items()}
    from presharded.vllm_compat import is_cpu

    if is_cpu():
        # vLLM 0.32's CPU build cannot load its own ahead-of-time artifact (dev/notebook.md, section 6);
        # without it the compiled code is Inductor's cache, which loads.
        env["VLLM_USE_AOT_COMPILE"] = "0"
    return env


@contextmanager
def workspace_locked(manifest: Manifest) -> Iterator[Path]:
    """WORKSPACE/ID, for this process alone while it is being filled: starts of
    one checkpoint on one machine (a replica per GPU) share it."""
    root = private_folder(WORKSPACE)
    workspace = root / checkpoint_id(manifest)
    fd = open_lock(root / f"{workspace.name}.lock")
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        workspace.mkdir(mode=0o700, exist_ok=True)
        yield workspace
    finally:
        os.close(fd)


def link_model(workspace: Path, folder: Path) -> None:
    """WORKSPACE/ID/model -> `folder`, replaced in one step (a running engine may read through it)."""
    workspace.mkdir(parents=True, exist_ok=True)
    link = workspace / "model"
    if link.is_symlink() and link.resolve() == folder.resolve():
        return
    tmp = workspace / f".model.{os.getpid()}"
    tmp.unlink(missing_ok=True)
    tmp.symlink_to(folder.resolve(), target_is_directory=True)
    os.replace(tmp, link)


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


def swap_in(new: Path, dest: Path) -> None:
    """`new` renamed to `dest`, the folder there before (if any) renamed away first, then removed."""
    old = dest.with_name(f".{dest.name}.old-{os.getpid()}")
    if dest.exists():
        dest.rename(old)
    new.rename(dest)
    shutil.rmtree(old, ignore_errors=True)


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


def counted(items: list, what: str) -> Iterator:
    with bar(len(items), what, unit="file") as progress:
        for item in items:
            yield item
            progress.update()


def trusted(folder: Path, name: str, entries: list[CopiedFile], trust: bool, otherwise: str) -> bool:
    """Whether the set may run: the user trusts it, or made it here; a warning if not."""
    if trusted_by_user(trust) or made_here(name, entries):
        return True
    print(f"warning: the start-up caches {name} in {folder} hold compiled code that this user did not make "
          f"on this machine: {otherwise}; if you trust whoever made them, pass {TRUST_FLAG} "
          f"(or set {TRUST_ENV}=1)", file=sys.stderr)
    return False


def matches(path: Path, entry: CopiedFile, sealed: Path | None = None) -> bool:
    """Whether `path` is the file that `entry` of the manifest describes: its size first (cheap), then
    its hash, unless its seal at `sealed` says it was checked and it has not changed since (`seal`)."""
    if not is_file_of_size(path, entry.size):
        return False
    if sealed is not None and is_sealed(path, entry, sealed):
        return True
    if hash_file(path) != entry.blake3:
        return False
    if sealed is not None:
        seal(path, entry, sealed)
    return True


def is_sealed(path: Path, entry: CopiedFile, sealed: Path) -> bool:
    try:
        stat, written = path.lstat(), sealed.lstat()
        if written.st_uid != os.getuid() or not S_ISREG(written.st_mode) or written.st_nlink != 1:
            return False  # a seal counts only where no one else could have written it
        return sealed.read_text() == stamp(stat, entry) and stat.st_ctime_ns < written.st_mtime_ns
    except OSError:
        return False


def seal(path: Path, entry: CopiedFile, sealed: Path) -> bool:
    """Records at `sealed` (in this user's own folder, as `path` is) that `path` was hashed and found
    to be `entry`: a later start skips hashing it again while it is the same file, unchanged (its
    inode, size, times). Any write to a file moves its change time, which no one can set back; a
    change within the clock's tick of the seal would not, so a seal counts only for a file last
    changed before it was written (git's rule for its index). Whether it counts."""
    try:
        sealed.parent.mkdir(parents=True, exist_ok=True)
        sealed.write_text(stamp(path.lstat(), entry))
        return path.lstat().st_ctime_ns < sealed.stat().st_mtime_ns
    except OSError:
        return False  # unsealed: hashed again next time


def stamp(stat: os.stat_result, entry: CopiedFile) -> str:
    return f"{entry.blake3} {stat.st_dev} {stat.st_ino} {stat.st_size} {stat.st_mtime_ns} {stat.st_ctime_ns}\n"


def is_file_of_size(path: Path, size: int) -> bool:
    try:
        stat = path.lstat()
    except OSError:
        return False
    return S_ISREG(stat.st_mode) and stat.st_size == size


def put_in_place(workspace: Path, folder: Path, name: str, entries: list[CopiedFile], kind: str = CACHES_DIR,
                 what: str = "the start-up caches") -> bool:
    """The set's files in the workspace, each copied there and checked there, where no one
    else can change it (and sealed there: a later start finds it checked); False (with a
    warning) if one is missing or damaged. What another start already put there stays: it
    may be running from it."""
    copied = []
    for entry in counted(entries, f"putting {what} {name} in place"):
        relative = entry.path.removeprefix(f"{kind}/{name}/")
        source, target, sealed = folder / entry.path, workspace / relative, workspace / SEALS / relative
        if matches(target, entry, sealed):
            continue
        target.parent.mkdir(parents=True, exist_ok=True)
        temporary = target.with_name(f".{target.name}.{os.getpid()}")
        try:
            if source.stat().st_size == entry.size:
                shutil.copyfile(source, temporary)
        except OSError:
            pass
        if not matches(temporary, entry):
            temporary.unlink(missing_ok=True)
            print(f"warning: {source} is missing or damaged (not as in {MANIFEST_NAME}): starting without "
                  f"{what} {name}", file=sys.stderr)
            return False
        os.replace(temporary, target)
        copied.append((target, entry, sealed))
    # Sealed once all are in place; those changed within the clock's tick of their seal, again once it has moved.
    if racy := [each for each in copied if not seal(*each)]:
        time.sleep(0.02)
        for each in racy:
            seal(*each)
    return True
