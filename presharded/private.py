"""Folders of this user's alone: where code from a checkpoint is put before it
runs, where a save to S3 stages its files, and where the user's trust is
recorded. Every folder on the way is checked, and so is everything inside a
folder found already there, so another user can neither make one of them
first, nor leave anything inside that we would later use, nor swap anything
between our checks and the engine's read. Locks are opened here too, never
through a link."""

import os
import stat
from pathlib import Path

from presharded.errors import UserError


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
