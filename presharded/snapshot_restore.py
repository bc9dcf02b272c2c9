"""Engine snapshots brought back (presharded/snapshot.py makes them): the
checkpoint's set for this machine and these flags, trusted, copied into this
user's memory folder and hashed there, restored by CRIU and cuda-checkpoint.
`restore` asks the restored engine one request (load_sharded_state.py
--snapshot); `serve` lets the restored server serve on the port asked for
(presharded-serve). Anything that does not fit gives one warning, and the
caller starts vLLM as usual."""

import json
import os
import shutil
import sys
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

import blake3

from presharded import prefetch, s3
from presharded.errors import UserError
from presharded.manifest import SNAPSHOTS_DIR, Manifest
from presharded.workspace import private_folder
from presharded.processes import alive, become_subreaper, end_children, ns_pid, reap, tree
from presharded.snapshot_sets import (COMPILED, CRIU_FLAGS, IMAGES, META, NAMESPACE_FLAGS, SERVER, compared_flags,
                                      is_kept, set_name, tool, unsupported)
from presharded.snapshot_inbox import DONE, ENGINE_LOG, REQUEST, inbox, put, rpc_folder, wait_for
from presharded.workspace import SEALS, WORKSPACE, is_file_of_size, link_model, put_in_place
from presharded.env import TRUST_SNAPSHOT_ENV
from presharded.trust import TRUST_SNAPSHOT_FLAG, made_here, trusted_by_user


@dataclass
class Generated:
    """What a restored engine answered, as vLLM's output has it."""

    text: str
    token_ids: list[int]


@dataclass
class Restore:
    """What became of a restore: the set it tried, whether it was used, why not, each phase's
    seconds; a restored engine's answer, or a restored server's exit code."""

    set: str | None = None
    used: bool = False
    reason: str | None = None
    huge_pages: str = "unknown"
    seconds: dict[str, float] = field(default_factory=dict)
    output: Generated | None = None
    exit_code: int | None = None

    def report(self) -> dict:
        """What --json tells of it."""
        return {"used": self.used, "set": self.set, "reason": self.reason, "huge_pages": self.huge_pages,
                "seconds": self.seconds}


def skip(status: Restore, reason: str) -> None:
    print(f"warning: not restoring the snapshot: {reason}; starting vLLM instead", file=sys.stderr)
    status.reason = reason


def ready_image(checkpoint: Path, manifest: Manifest, flags: list[str], trust: bool, status: Restore,
                server: bool, s3_url: str | None = None) -> tuple[Path, Path] | None:
    """The checkpoint's set for this machine and `flags`, trusted, copied into this user's memory
    folder and checked there, its compile caches in the workspace: (the image, the workspace);
    None, with one warning (and the reason in `status`), when there is none that can run here.
    With `s3_url`, `checkpoint` holds its small files: the set streams from S3, its kept weights
    into that folder, where the restored engine reads them."""
    status.huge_pages = huge_pages()
    start = time.perf_counter()
    kind = "server snapshot (presharded-snapshot --server)" if server else "engine snapshot (presharded-snapshot)"
    sets = [s for s in manifest.snapshots if s.startswith(SERVER) == server]
    where = s3_url or checkpoint
    if not sets:
        return skip(status, f"{where} has no {kind}")
    name = status.set = set_name(flags, manifest.tensor_parallel_size, manifest.pipeline_parallel_size, server)
    if name not in sets:
        return skip(status, f"{where} has {', '.join(sorted(sets))}, none for {name} "
                    "(this GPU, driver, vLLM, torch, layout and engine flags)")
    entries = manifest.snapshots[name]
    if not (trusted_by_user(trust, TRUST_SNAPSHOT_ENV) or made_here(name, entries, SNAPSHOTS_DIR)):
        return skip(status, f"{name} is a whole process that this user did not make on this machine; if you "
                    f"trust whoever made it, pass {TRUST_SNAPSHOT_FLAG} (or set {TRUST_SNAPSHOT_ENV}=1)")
    try:
        images = private_folder(IMAGES / f"presharded-{os.getuid()}")
        workspace = private_folder(WORKSPACE) / manifest.id
    except UserError as e:
        return skip(status, str(e))
    image = images / f"snapshot-{blake3.blake3(name.encode()).hexdigest()[:16]}"
    for other in images.glob("snapshot-*"):  # one image at a time in memory
        if other != image:
            shutil.rmtree(other, ignore_errors=True)
    compiled = compiled_of(entries, name)
    kept = [e for e in entries if is_kept(e.path, name)]  # weights: read from the checkpoint, checked as its own
    source, copy = (s3_url, s3.copier(s3_url, manifest)) if s3_url else (checkpoint, None)
    if s3_url and not put_in_place(checkpoint / SNAPSHOTS_DIR / name, s3_url, name, kept, SNAPSHOTS_DIR,
                                   "the snapshot", copy):
        status.reason = "its weights are missing or damaged"  # put_in_place warned
        return None
    if damaged := [e.path for e in kept if not is_file_of_size(checkpoint / e.path, e.size)]:
        return skip(status, f"its weights {damaged[0]} are missing or not of the size in the manifest")
    if not put_in_place(image, source, name, [e for e in entries if e not in compiled + kept], SNAPSHOTS_DIR,
                        "the snapshot", copy):
        status.reason = "its image is missing or damaged"  # put_in_place warned
        return None
    meta = meta_of(image)
    if (made_with := meta.get("python")) != os.path.realpath(sys.executable):
        return skip(status, f"it was made with {made_with or 'an unknown Python'}; this is "
                    f"{os.path.realpath(sys.executable)} (the Python environment must be at the same paths)")
    if problem := unsupported(manifest, 1, flags):
        return skip(status, problem)
    # Its compiled code goes where the image expects it, the workspace's caches: last, and taken back
    # if the restore does not happen, so that no later start uses what only this snapshot was trusted for.
    if not put_in_place(workspace, source, COMPILED, compiled, f"{SNAPSHOTS_DIR}/{name}", f"the snapshot {name}'s",
                        copy):
        withdraw(workspace, compiled, name)
        status.reason = "its compiled code is missing or damaged"  # put_in_place warned
        return None
    link_model(workspace, checkpoint)
    status.seconds["check"] = time.perf_counter() - start
    # The libraries' pages the process held, read in order now: the restore would fault them in one at a
    # time (on a new node, behind the weights' read-ahead).
    t = time.perf_counter()
    prefetch.read_ranges(meta.get("mapped_pages"))
    status.seconds["mapped"] = time.perf_counter() - t
    return image, workspace


def compiled_of(entries: list, name: str) -> list:
    """The set's compile caches (COMPILED), which a restore puts in the workspace."""
    return [e for e in entries if e.path.startswith(f"{SNAPSHOTS_DIR}/{name}/{COMPILED}/")]


def withdraw(workspace: Path, compiled: list, name: str) -> None:
    """The set's compiled files taken out of the workspace again (with their seals): a snapshot
    that was not restored leaves nothing there that a later start would use."""
    for entry in compiled:
        relative = entry.path.removeprefix(f"{SNAPSHOTS_DIR}/{name}/{COMPILED}/")
        for path in (workspace / relative, workspace / SEALS / relative):
            path.unlink(missing_ok=True)


def take_back(status: Restore, manifest: Manifest, workspace: Path) -> None:
    """After a restore that failed once the set was in place: its compiled files out of the workspace."""
    name = status.set
    withdraw(workspace, compiled_of(manifest.snapshots[name], name), name)


def not_restored(status: Restore, manifest: Manifest, workspace: Path, reason: str) -> None:
    take_back(status, manifest, workspace)
    return skip(status, reason)


def bring_back(image: Path, box: Path, seconds: dict) -> int:
    """CRIU restores the image's processes, cuda-checkpoint their GPU state: the root's PID."""
    rpc_folder()
    t = time.perf_counter()
    tool(shutil.which("criu"), "restore", "-D", str(image), "-W", str(box), *CRIU_FLAGS, *NAMESPACE_FLAGS,
         "--root", "/", "-d", "--pidfile", str(box / "restored.pid"), "-o", "restore.log", log=box / "restore.log")
    pid = int((box / "restored.pid").read_text())
    seconds["restore"] = time.perf_counter() - t
    if cuda_pids := meta_of(image).get("cuda_pids", []):
        t = time.perf_counter()
        inside = {ns_pid(each): each for each in tree(pid)}  # the namespace's PIDs, as the image has them
        for cuda in cuda_pids:
            if cuda not in inside:
                raise UserError(f"the restored process {cuda}, which held the GPU, is not there")
            tool(shutil.which("cuda-checkpoint"), "--toggle", "--pid", str(inside[cuda]))
        seconds["cuda_restore"] = time.perf_counter() - t
    return pid


def restore(checkpoint: Path, manifest: Manifest, argv: list[str], request: dict, trust: bool = False,
            image_ready: Callable[[], object] = lambda: None, s3_url: str | None = None) -> Restore:
    """The verb of `load_sharded_state.py --snapshot`: the checkpoint's snapshot for this machine and these
    engine flags, restored, asked `request`: its answer in `output`; none, with one warning, when it
    cannot be (the caller then starts vLLM). `image_ready` is called once the image is in memory and
    checked, before the restore: the disk is free then for what the engine reads next. With `s3_url`
    the set comes from S3 (`checkpoint`: its small files), and the engine reads its weights there."""
    status = Restore()
    start = time.perf_counter()
    if (ready := ready_image(checkpoint, manifest, compared_flags(argv), trust, status, False, s3_url)) is None:
        return status
    image_ready()
    seconds = status.seconds
    image, workspace = ready
    with inbox(manifest) as box:
        put(box / REQUEST, {**request, "log": str(box / ENGINE_LOG), **weights_from(s3_url)})
        become_subreaper()  # the restored process becomes this one's child: waited for, and killed with it
        try:
            pid = bring_back(image, box, seconds)
            done = wait_for(box / DONE, lambda: alive(pid), 600, "the restored engine")
        except BaseException as e:
            end_children()
            if isinstance(e, UserError):
                not_restored(status, manifest, workspace, str(e))
                return status
            take_back(status, manifest, workspace)
            raise
        finally:
            (box / REQUEST).unlink(missing_ok=True)  # it may hold credentials
        t = time.perf_counter()
        reap(pid)  # after its answer: a GPU process's exit takes time of its own
        seconds["exit"] = time.perf_counter() - t
        relay(box / ENGINE_LOG)
    if "error" in done:
        if done.get("request"):
            raise UserError(f"{done['error']} (--prompt, --max-tokens, --max-model-len)")
        not_restored(status, manifest, workspace, f"the restored engine failed: {done['error']} (its log is above)")
        return status
    seconds.update(done["seconds"])
    seconds["total"] = time.perf_counter() - start
    status.used, status.seconds = True, {k: round(v, 3) for k, v in seconds.items()}
    status.output = Generated(done["text"], done["token_ids"])
    return status


def restore_server(checkpoint: Path, manifest: Manifest, argv: list[str], trust: bool = False,
                   s3_url: str | None = None) -> Restore:
    """The verb of presharded-serve: the checkpoint's server snapshot for this machine and these flags,
    restored to serve as `argv` asks (its port, its key): the server's exit code in `exit_code` once it
    stops; none, with one warning, when it cannot be restored (the caller then starts vLLM's server).
    With `s3_url`, as `restore`."""
    status = Restore()
    start = time.perf_counter()
    if (ready := ready_image(checkpoint, manifest, compared_flags(argv, True), trust, status, True, s3_url)) is None:
        return status
    seconds = status.seconds
    image, workspace = ready
    if (key := os.environ.get("VLLM_API_KEY")) and "--api-key" not in compared_flags(argv):
        argv = [*argv, "--api-key", key]  # the image's environment holds no secrets: the key goes with the request
    log = workspace / f"server-{os.getpid()}.log"  # outside the inbox, which is free once the server is up
    become_subreaper()
    try:
        with following(log):
            with inbox(manifest) as box:  # another restore of this checkpoint waits here only while this one starts
                put(box / REQUEST, {"argv": ["--model", str(workspace / "model"), *argv],
                                    "name": s3_url or str(checkpoint), "log": str(log), **weights_from(s3_url)})
                try:
                    pid = bring_back(image, box, seconds)
                    done = wait_for(box / DONE, lambda: alive(pid), 600, "the restored server")
                finally:
                    (box / REQUEST).unlink(missing_ok=True)  # it may hold the key and credentials
            if "error" in done:
                raise UserError(f"the restored server failed: {done['error']} (its log is above)")
            seconds.update(done["seconds"], total=time.perf_counter() - start)
            status.used, status.seconds = True, {k: round(v, 3) for k, v in seconds.items()}
            print(f"restored {status.set}: serving on {done['listen']}, {seconds['total']:.2f} s after the "
                  f"start ({', '.join(f'{k} {v:.2f} s' for k, v in status.seconds.items())})",
                  file=sys.stderr, flush=True)
            status.exit_code = until_it_exits(pid)
            return status
    except BaseException as e:
        end_children()
        if status.used:  # it served, then ended: its code stays with the trust it was given
            raise
        if isinstance(e, UserError):
            not_restored(status, manifest, workspace, str(e))
            return status
        take_back(status, manifest, workspace)
        raise
    finally:
        log.unlink(missing_ok=True)


def weights_from(s3_url: str | None) -> dict:
    """For a request: where the restored engine reads the checkpoint's weights, if not from its folder
    (S3, with what this process's AWS chain reads from the environment: the image's holds none)."""
    return {"s3": {"url": s3_url, "env": s3.aws_environment()}} if s3_url else {}


def huge_pages() -> str:
    """This host's transparent huge pages: "always" lets CRIU restore the image's pages 2 MiB at a time
    (its madvise flags come back only after the pages), which made the warm 8B start 1.2-1.3x faster
    (dev/results/snapshot-warm-2026-12-02-h200)."""
    try:
        setting = Path("/sys/kernel/mm/transparent_hugepage/enabled").read_text()
    except OSError:
        return "unknown"
    return setting.partition("[")[2].partition("]")[0] or "unknown"


def meta_of(image: Path) -> dict:
    """The set's snapshot.json ({} if it is missing or unreadable)."""
    try:
        meta = json.loads((image / META).read_text())
        return meta if isinstance(meta, dict) else {}
    except (OSError, ValueError):
        return {}


@contextmanager
def following(log: Path) -> Iterator[None]:
    """What the restored process writes to `log`, copied to this process's stderr as it comes."""
    import threading

    stop = threading.Event()

    def copy() -> None:
        with open(log, "a+", errors="replace") as f:
            f.seek(0)
            while not stop.wait(0.1):
                sys.stderr.write(f.read())
            sys.stderr.write(f.read())

    thread = threading.Thread(target=copy, daemon=True)
    thread.start()
    try:
        yield
    finally:
        stop.set()
        thread.join()


def until_it_exits(pid: int) -> int:
    """Wait for the restored server (SIGTERM and SIGINT passed on to it); its exit code, once what
    outlived it is ended too."""
    import signal

    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, lambda number, frame: os.kill(pid, number))
    code = os.waitstatus_to_exitcode(os.waitpid(pid, 0)[1])
    end_children()
    return code


def relay(log: Path) -> None:
    if log.exists():
        sys.stderr.write(log.read_text(errors="replace"))
