"""This user's private workspace. Folders of this user's alone: where code
from a checkpoint is put before it runs (WORKSPACE/ID, one per checkpoint,
shared by start-up caches and snapshots), where a save to S3 stages its
files, and where the user's trust is recorded. Every folder on the way is
checked, and so is everything inside a folder found already there, so another
user can neither make one of them first, nor leave anything inside that we
would later use, nor swap anything between our checks and the engine's read.
A checkpoint's files are copied in and hashed there (sealed, so that a later
start need not hash them again); locks are opened here, never through a link."""

import fcntl
import os
import shutil
import stat
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path

from presharded.errors import UserError
from presharded.manifest import CACHES_DIR, MANIFEST_NAME, CopiedFile, Manifest, copy_hashed, hash_file
from presharded.progress import bar

WORKSPACE = Path(tempfile.gettempdir()) / f"presharded-{os.getuid()}"
SEALS = ".checked"  # in a workspace: which of its copies were hashed (put_in_place)


def private_folder(path: Path) -> Path:
    """`path` (absolute), with missing folders made with mode 0700, once every
    folder above it belongs to this user or root and cannot be written by
    others (a root-owned sticky folder such as /tmp can), and `path` itself
    is this user's own real folder, written by no one else; if it was there
    already, so is everything inside it (what another user left in it before
    its owner or mode were fixed would be theirs still)."""
    path = Path(os.path.abspath(path))
    made = False
    for folder in [*reversed(path.parents), path]:
        try:
            os.mkdir(folder, 0o700)
            made = True
        except FileExistsError:
            made = False
        except OSError as e:
            raise UserError(f"cannot make {folder} ({e.strerror}); check its permissions")
        if problem := unsafe(folder, own=folder == path):
            raise not_private(folder, problem, path)
    if not made:
        for inside, problem in not_own(path):
            raise not_private(inside, problem, path)
    return path


def not_private(where: Path, problem: str, path: Path) -> UserError:
    """Fixing the mode or owner is not enough: another user may have left files inside, or hold them open."""
    if where != path and path not in where.parents:  # a folder above it
        return UserError(f"{where} {problem}, so another user could change what runs from {path}; "
                         "use a place that only this user and root can write (TMPDIR, XDG_STATE_HOME)")
    return UserError(f"{where} {problem}, so another user could change what runs from {path}; "
                     f"remove {path} (rm -rf {path}): it is made anew")


def unsafe(folder: Path, *, own: bool) -> str | None:
    st = os.lstat(folder)
    uid = os.getuid()
    if stat.S_ISLNK(st.st_mode):
        return "is a symlink"
    if not stat.S_ISDIR(st.st_mode):
        return "is not a folder"
    if st.st_uid != uid and (own or st.st_uid != 0):
        return f"belongs to uid {st.st_uid}, not to this user (uid {uid})" + ("" if own else " or root")
    sticky = st.st_uid == 0 and st.st_mode & stat.S_ISVTX
    if st.st_mode & (stat.S_IWGRP | stat.S_IWOTH) and (own or not sticky):
        return "can be written by other users"
    return None


def not_own(folder: Path):
    """Each entry under `folder` (never followed through a link) that another user made, or, where
    others may enter `folder`, that other users can write: (its path, what is wrong). Inside a
    folder only this user can enter (0700, as made here), a mode that lets a group write does not
    matter (umask 002 makes such files)."""
    uid = os.getuid()
    others_enter = os.lstat(folder).st_mode & (stat.S_IXGRP | stat.S_IXOTH)
    for root, folders, files in os.walk(folder):
        for name in [*folders, *files]:
            path = Path(root) / name
            try:
                st = os.lstat(path)
            except FileNotFoundError:  # removed meanwhile (by this user: no one else can)
                continue
            if st.st_uid != uid:
                yield path, f"belongs to uid {st.st_uid}, not to this user (uid {uid})"
            elif others_enter and not (stat.S_ISLNK(st.st_mode) or stat.S_ISSOCK(st.st_mode)) and \
                    st.st_mode & (stat.S_IWGRP | stat.S_IWOTH):
                yield path, "can be written by other users"


def open_lock(path: Path) -> int:
    """A file descriptor of the lock file at `path` (made 0600 if missing) for flock: never opened
    through a symlink, and refused unless it is a plain file of this user's with no other name (a
    hard link), so that writing our pid into it never writes into someone else's file."""
    try:
        fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC, 0o600)
    except OSError as e:
        if problem := lock_problem(path):  # a symlink, or a file of another user's (the kernel may say EACCES)
            raise UserError(f"the lock {path} {problem}, which another user may have made; remove it") from None
        raise UserError(f"cannot open the lock {path} ({e.strerror}); check that you can write to its folder") \
            from None
    if problem := lock_problem(fd):
        os.close(fd)
        raise UserError(f"the lock {path} {problem}, which another user may have made; remove it")
    return fd


def lock_problem(what: Path | int) -> str | None:
    try:
        st = os.fstat(what) if isinstance(what, int) else os.lstat(what)
    except OSError:
        return None
    if stat.S_ISLNK(st.st_mode):
        return "is a symlink"
    if not stat.S_ISREG(st.st_mode):
        return "is not a plain file"
    if st.st_uid != os.getuid():
        return f"belongs to uid {st.st_uid}, not to this user"
    if st.st_nlink != 1:
        return "has other names (hard links)"
    return None


@contextmanager
def workspace_locked(manifest: Manifest) -> Iterator[Path]:
    """WORKSPACE/ID, for this process alone while it is being filled: starts of
    one checkpoint on one machine (a replica per GPU) share it."""
    root = private_folder(WORKSPACE)
    workspace = root / manifest.id
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


def swap_in(new: Path, dest: Path) -> None:
    """`new` renamed to `dest`, the folder there before (if any) renamed away first, then removed."""
    old = dest.with_name(f".{dest.name}.old-{os.getpid()}")
    if dest.exists():
        dest.rename(old)
    new.rename(dest)
    shutil.rmtree(old, ignore_errors=True)


def counted(items: list, what: str) -> Iterator:
    with bar(len(items), what, unit="file") as progress:
        for item in items:
            yield item
            progress.update()


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
        st, written = path.lstat(), sealed.lstat()
        if written.st_uid != os.getuid() or not stat.S_ISREG(written.st_mode) or written.st_nlink != 1:
            return False  # a seal counts only where no one else could have written it
        return sealed.read_text() == stamp(st, entry) and st.st_ctime_ns < written.st_mtime_ns
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


def stamp(st: os.stat_result, entry: CopiedFile) -> str:
    return f"{entry.blake3} {st.st_dev} {st.st_ino} {st.st_size} {st.st_mtime_ns} {st.st_ctime_ns}\n"


def is_file_of_size(path: Path, size: int) -> bool:
    try:
        st = path.lstat()
    except OSError:
        return False
    return stat.S_ISREG(st.st_mode) and st.st_size == size


Copy = Callable[[CopiedFile, Path], str]  # an entry's file written to a path, hashed as it is: its hash


def local_copy(folder: Path) -> Copy:
    """Copies from the checkpoint in `folder`, each read once (a file not of the manifest's size: not copied)."""

    def copy(entry: CopiedFile, target: Path) -> str:
        source = folder / entry.path
        return copy_hashed(source, target) if source.stat().st_size == entry.size else ""

    return copy


def put_in_place(workspace: Path, folder: Path | str, name: str, entries: list[CopiedFile], kind: str = CACHES_DIR,
                 what: str = "the start-up caches", copy: Copy | None = None) -> bool:
    """The set's files in the workspace, each copied there from the checkpoint at `folder` (by `copy`
    where it is not a local folder) and checked there, where no one else can change it (and sealed
    there: a later start finds it checked); False (with a warning) if one is missing or damaged. What
    another start already put there stays: it may be running from it."""
    copy = copy or local_copy(Path(folder))
    copied = []
    for entry in counted(entries, f"putting {what} {name} in place"):
        relative = entry.path.removeprefix(f"{kind}/{name}/")
        target, sealed = workspace / relative, workspace / SEALS / relative
        if matches(target, entry, sealed):
            continue
        target.parent.mkdir(parents=True, exist_ok=True)
        temporary = target.with_name(f".{target.name}.{os.getpid()}")
        try:  # read once: hashed as it is copied (a short or changed file does not hash as in the manifest)
            same = copy(entry, temporary) == entry.blake3
        except (OSError, UserError):
            same = False
        if not same or not is_file_of_size(temporary, entry.size):
            temporary.unlink(missing_ok=True)
            where = f"{str(folder).rstrip('/')}/{entry.path}"
            print(f"warning: {where} is missing or damaged (not as in {MANIFEST_NAME}): starting without {what} {name}",
                  file=sys.stderr)
            return False
        os.replace(temporary, target)
        copied.append((target, entry, sealed))
    # Sealed once all are in place; those changed within the clock's tick of their seal, again once it has moved.
    if racy := [each for each in copied if not seal(*each)]:
        time.sleep(0.02)
        for each in racy:
            seal(*each)
    return True
