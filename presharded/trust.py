"""Which start-up cache sets and engine snapshots run: they hold compiled code
(a snapshot, a whole process), and a manifest's hashes prove only that files
are unchanged since someone wrote the manifest, not who that was. A set runs
when this user made it on this machine (its content hash is recorded in the
user's own state folder, outside any checkpoint, so a later edit is not
trusted), or when the user says so (--trust-start-caches or
--trust-snapshot, or their environment variables for vLLM's server)."""

import json
import os
from datetime import datetime, timezone
from pathlib import Path

import blake3

from presharded.env import TRUST_ENV
from presharded.errors import UserError
from presharded.manifest import CACHES_DIR, SNAPSHOTS_DIR, CopiedFile
from presharded.workspace import private_folder

TRUST_FLAG = "--trust-start-caches"
TRUST_SNAPSHOT_FLAG = "--trust-snapshot"
RECORDS = {CACHES_DIR: "trusted-start-caches", SNAPSHOTS_DIR: "trusted-snapshots"}


def trusted_by_user(flag: bool = False, env: str = TRUST_ENV) -> bool:
    """The user trusts every checkpoint's sets of this kind: the flag, or the environment variable."""
    return flag or os.environ.get(env, "").lower() in ("1", "true", "yes")


def set_digest(name: str, entries: list[CopiedFile], kind: str = CACHES_DIR) -> str:
    """The set's content: every file's place inside the set, size and hash (not where the checkpoint is)."""
    listing = sorted((e.path.removeprefix(f"{kind}/{name}/"), e.size, e.blake3) for e in entries)
    return blake3.blake3(json.dumps(listing).encode()).hexdigest()


def records(kind: str = CACHES_DIR) -> Path:
    state = os.environ.get("XDG_STATE_HOME") or str(Path.home() / ".local" / "state")
    return private_folder(Path(state) / "presharded" / RECORDS[kind])


def made_here(name: str, entries: list[CopiedFile], kind: str = CACHES_DIR) -> bool:
    """Whether this user recorded this very set (same content) as made by them."""
    try:
        return (records(kind) / set_digest(name, entries, kind)).is_file()
    except UserError:
        return False  # no safe place for records: nothing is recorded there


def record(name: str, entries: list[CopiedFile], checkpoint: Path, kind: str = CACHES_DIR) -> None:
    """This user made this set: later starts from any copy of it may run it."""
    when = datetime.now(timezone.utc).isoformat(timespec="seconds")
    (records(kind) / set_digest(name, entries, kind)).write_text(f"{name}\n{checkpoint.resolve()}\n{when}\n")
