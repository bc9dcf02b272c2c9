"""Folders of this user's alone: where code from a checkpoint is put before it
runs, and where the user's trust is recorded. Every folder on the way is
checked, so another user can neither make one of them first nor swap
anything inside between our checks and the engine's read."""

import os
import stat
from pathlib import Path

from presharded.errors import UserError


def private_folder(path: Path) -> Path:
    """`path` (absolute), with missing folders made with mode 0700, once every
    folder above it belongs to this user or root and cannot be written by
    others (a root-owned sticky folder such as /tmp can), and `path` itself
    is this user's own real folder, written by no one else."""
    path = Path(os.path.abspath(path))
    for folder in [*reversed(path.parents), path]:
        try:
            os.mkdir(folder, 0o700)
        except FileExistsError:
            pass
        except OSError as e:
            raise UserError(f"cannot make {folder} ({e.strerror}); check its permissions")
        if problem := unsafe(folder, own=folder == path):
            raise UserError(f"{folder} {problem}, so another user could change what runs from {path}; "
                            f"remove it, or fix its owner and mode (chmod 700)")
    return path


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
