"""Which start-up cache sets run: they hold compiled code, and a manifest's
hashes prove only that files are unchanged since someone wrote the manifest,
not who that was. A set runs when this user made it on this machine (its
content hash is recorded in the user's own state folder, outside any
checkpoint, so a later edit is not trusted), or when the user says so
(--trust-start-caches, or PRESHARDED_TRUST_START_CACHES=1 for vLLM's server)."""

import json
import os
from datetime import datetime, timezone
from pathlib import Path

import blake3

from presharded.errors import UserError
from presharded.manifest import CACHES_DIR, CopiedFile
from presharded.private import private_folder

TRUST_ENV = "PRESHARDED_TRUST_START_CACHES"
TRUST_FLAG = "--trust-start-caches"


def trusted_by_user(flag: bool = False) -> bool:
    """The user trusts every checkpoint's start-up caches: the flag, or the environment variable."""
    return flag or os.environ.get(TRUST_ENV, "").lower() in ("1", "true", "yes")


def set_digest(name: str, entries: list[CopiedFile]) -> str:
    """The set's content: every file's place inside the set, size and hash (not where the checkpoint is)."""
    listing = sorted((e.path.removeprefix(f"{CACHES_DIR}/{name}/"), e.size, e.blake3) for e in entries)
    return blake3.blake3(json.dumps(listing).encode()).hexdigest()


def records() -> Path:
    state = os.environ.get("XDG_STATE_HOME") or str(Path.home() / ".local" / "state")
    return private_folder(Path(state) / "presharded" / "trusted-start-caches")


def made_here(name: str, entries: list[CopiedFile]) -> bool:
    """Whether this user recorded this very set (same content) as made by them."""
    try:
        return (records() / set_digest(name, entries)).is_file()
    except UserError:
        return False  # no safe place for records: nothing is recorded there


def record(name: str, entries: list[CopiedFile], checkpoint: Path) -> None:
    """This user made this set: later starts from any copy of it may run it."""
    when = datetime.now(timezone.utc).isoformat(timespec="seconds")
    (records() / set_digest(name, entries)).write_text(f"{name}\n{checkpoint.resolve()}\n{when}\n")
