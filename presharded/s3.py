"""Checkpoints in object storage (s3://bucket/prefix): every call to S3 lives
here. Credentials and the endpoint come from the standard AWS chain
(AWS_ENDPOINT_URL, AWS_ACCESS_KEY_ID, profiles, ...) through boto3, which
reads a range straight into our staging buffers (no copy through bytes).

A save writes the checkpoint locally as usual, then uploads it: every file,
then the manifest last, which records each object's ETag. A reader fetches
the manifest and the small files (config, tokenizer, start-up caches) into a
local folder and checks them as it checks a folder; the weights stay in S3
and are read in ranges, each GET made with If-Match on the manifest's ETag,
so an object changed since the manifest was written is never read."""

import hashlib
import os
import shutil
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

from presharded.errors import UserError
from presharded.manifest import (MANIFEST_NAME, MAX_MANIFEST_BYTES, Manifest, hash_header_of, read_manifest,
                                 write_hashed)

SCHEME = "s3://"
THREADS = 16
CHUNK = 64 * 2**20


def is_s3(text: str | os.PathLike | None) -> bool:
    return isinstance(text, str) and text.startswith(SCHEME)


def split(url: str) -> tuple[str, str]:
    """s3://bucket/prefix -> (bucket, "prefix/"), the prefix empty or ending in /."""
    bucket, _, prefix = url.removeprefix(SCHEME).partition("/")
    if not bucket:
        raise UserError(f"{url} names no bucket; use s3://BUCKET/PREFIX")
    prefix = prefix.strip("/")
    return bucket, f"{prefix}/" if prefix else ""


_clients: dict[int, object] = {}


def client():
    """One boto3 client per process (they are thread-safe), from the standard AWS chain."""
    if os.getpid() not in _clients:
        try:
            import boto3
            from botocore.config import Config
        except ImportError:
            raise UserError("s3:// needs boto3: pip install boto3") from None
        config = Config(max_pool_connections=2 * THREADS, retries={"max_attempts": 3, "mode": "standard"})
        _clients[os.getpid()] = boto3.client("s3", config=config)
    return _clients[os.getpid()]


def failed(e: Exception, url: str) -> UserError:
    """One line for what S3 answered (or that it did not)."""
    from botocore.exceptions import ClientError

    if isinstance(e, ClientError):
        code = e.response.get("Error", {}).get("Code", "")
        fixes = {"NoSuchBucket": "there is no such bucket: check its name and AWS_ENDPOINT_URL",
                 "NoSuchKey": "check the prefix: is a checkpoint there?", "404": "check the prefix",
                 "AccessDenied": "check the credentials (AWS_PROFILE, AWS_ACCESS_KEY_ID) and the bucket's policy",
                 "403": "check the credentials and the bucket's policy",
                 "PreconditionFailed": "it was changed since its manifest was written: save it again",
                 "412": "it was changed since its manifest was written: save it again"}
        return UserError(f"{url}: {code or 'error'} ({e.response.get('Error', {}).get('Message', '')}); "
                         f"{fixes.get(code, 'check the bucket, the prefix and the credentials')}")
    return UserError(f"{url}: {e}; check AWS_ENDPOINT_URL and that the server is up")


def call(url: str, method: str, **kwargs):
    from botocore.exceptions import BotoCoreError, ClientError

    try:
        return getattr(client(), method)(**kwargs)
    except (BotoCoreError, ClientError) as e:
        raise failed(e, url) from None


@dataclass(frozen=True)
class S3Object:
    """A checkpoint's file in S3, as the reader reads it: `read` and `read_into` at an offset."""

    url: str
    bucket: str
    key: str
    size: int
    etag: str

    @property
    def name(self) -> str:
        return self.key.rsplit("/", 1)[-1]

    def read(self, offset: int, length: int) -> bytes:
        view = memoryview(bytearray(min(length, max(self.size - offset, 0))))
        self.read_into(view, offset)
        return bytes(view)

    def read_into(self, view: memoryview, offset: int) -> None:
        if not len(view):
            return
        from botocore.exceptions import BotoCoreError, ClientError
        from urllib3.exceptions import HTTPError

        try:
            body = client().get_object(Bucket=self.bucket, Key=self.key, IfMatch=self.etag,
                                       Range=f"bytes={offset}-{offset + len(view) - 1}")["Body"]
            done = 0
            while done < len(view):
                n = body._raw_stream.readinto(view[done:])  # urllib3's response, into our buffer
                if not n:
                    raise UserError(f"{self.url}: the server ended the read at byte {offset + done} of "
                                    f"{offset + len(view)}; check that it is up, and load again")
                done += n
        except (BotoCoreError, ClientError) as e:
            raise failed(e, self.url) from None
        except (OSError, HTTPError) as e:  # the connection broke mid-read
            raise UserError(f"{self.url}: the read broke off ({type(e).__name__}); check that the server is up, "
                            "and load again") from None


def objects(url: str, manifest: Manifest, paths: list[str]) -> list[S3Object]:
    """The checkpoint's files at `paths` as S3 objects, their ETags from the manifest."""
    bucket, prefix = split(url)
    sizes = {e.path: e.size for e in manifest.entries()}
    return [S3Object(f"{url.rstrip('/')}/{p}", bucket, prefix + p, sizes[p], manifest.etags.get(p, "*"))
            for p in paths]


def copier(url: str, manifest: Manifest):
    """A snapshot's files streamed from `url` into local files (this user's memory, for a restore), each
    hashed as it arrives, with no copy on a disk first: put_in_place's `copy`."""

    paths = [e.path for entries in manifest.snapshots.values() for e in entries]
    listed = dict(zip(paths, objects(url, manifest, paths)))  # once: objects() reads the whole manifest

    def copy(entry, target: Path) -> str:
        return write_hashed(listed[entry.path].read, entry.size, target, THREADS)

    return copy


def aws_environment() -> dict[str, str]:
    """What the standard AWS chain reads from the environment here (credentials, endpoint, region):
    a restored engine, whose environment is its snapshot's, needs it to read the weights."""
    return {k: v for k, v in os.environ.items() if k.startswith("AWS_")}


def check_objects(listed: list[S3Object]) -> None:
    """Every object is there, of the manifest's size and ETag (any ETag where it lists none)."""

    def check(obj: S3Object) -> None:
        head = call(obj.url, "head_object", Bucket=obj.bucket, Key=obj.key)
        if head["ContentLength"] != obj.size or obj.etag not in ("*", head["ETag"]):
            raise UserError(f"{obj.url} is not the object its manifest lists (size {head['ContentLength']}, "
                            f"ETag {head['ETag']}); it was changed or damaged: save it again")

    with ThreadPoolExecutor(THREADS) as pool:
        list(pool.map(check, listed))


def check_weights(url: str, manifest: Manifest, shards: list, verify_hashes: bool) -> None:
    """The weight objects of `shards`: there, of the manifest's sizes and ETags, their tensor
    tables as saved (and with `verify_hashes` every byte)."""
    listed = objects(url, manifest, [s.path for s in shards])
    check_objects(listed)

    def check(pair) -> None:
        shard, obj = pair
        if shard.header_blake3 and hash_header_of(obj.read) != shard.header_blake3:
            raise UserError(f"{obj.url}: its tensor table (names, shapes, dtypes) is not the one saved; save it again")
        if verify_hashes and hash_object(obj) != shard.blake3:
            raise UserError(f"{obj.url} does not match its hash in the manifest: it was changed or damaged; "
                            "save it again")

    with ThreadPoolExecutor(THREADS) as pool:
        list(pool.map(check, zip(shards, listed)))


def local_copy(url: str) -> Path:
    """Where a reader keeps an S3 checkpoint's small files: this user's cache, one folder per URL."""
    cache = Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "presharded" / "s3"
    return cache / hashlib.sha256(url.rstrip("/").encode()).hexdigest()[:16]


def upload_folder(url: str) -> Path:
    """Where a save to `url` writes the checkpoint before uploading it: inside a folder of this
    user's alone (presharded/workspace.py), so that no one else can put or swap anything in what
    is uploaded, nor see the model."""
    import tempfile

    from presharded.workspace import private_folder

    return private_folder(Path(tempfile.gettempdir()) / f"presharded-upload-{os.getuid()}") / local_copy(url).name


def fetch(url: str) -> Path:
    """The manifest and the small files of the checkpoint at `url` (not the weights), in a
    local folder; their hashes are checked by the caller, as for a folder. Fetched beside it
    first: a refusal or a failure leaves nothing behind (nor does a fetch killed before, once
    the next one runs)."""
    bucket, prefix = split(url)
    folder = local_copy(url)
    for left in folder.parent.glob(f".{folder.name}.*"):  # what killed fetches left
        if not pid_alive(left.suffix[1:]):
            shutil.rmtree(left, ignore_errors=True)
    new = folder.with_name(f".{folder.name}.{os.getpid()}")
    shutil.rmtree(new, ignore_errors=True)
    new.mkdir(parents=True)
    try:
        fetch_into(new, url, bucket, prefix)
    except BaseException:
        shutil.rmtree(new, ignore_errors=True)
        raise
    shutil.rmtree(folder, ignore_errors=True)
    new.rename(folder)
    return folder


def fetch_into(new: Path, url: str, bucket: str, prefix: str) -> None:
    where = f"{url.rstrip('/')}/{MANIFEST_NAME}"
    head = head_manifest(url, bucket, prefix + MANIFEST_NAME)
    if head["ContentLength"] > MAX_MANIFEST_BYTES:
        raise UserError(f"{where} is larger than any manifest; save the checkpoint again")
    body = call(where, "get_object", Bucket=bucket, Key=prefix + MANIFEST_NAME, IfMatch=head["ETag"])["Body"]
    (new / MANIFEST_NAME).write_bytes(body.read())
    manifest = read_manifest(new)
    small = [*manifest.files, *(e for entries in manifest.caches.values() for e in entries)]
    buffer = memoryview(bytearray(CHUNK))
    for entry, obj in zip(small, objects(url, manifest, [e.path for e in small])):
        target = new / entry.path
        target.parent.mkdir(parents=True, exist_ok=True)
        with open(target, "wb") as f:
            for offset in range(0, entry.size, CHUNK):  # a chunk at a time: the manifest's sizes are untrusted
                view = buffer[: min(CHUNK, entry.size - offset)]
                obj.read_into(view, offset)
                f.write(view)


def pid_alive(text: str) -> bool:
    if not text.isdigit():
        return True  # not a fetch's folder: left alone
    try:
        os.kill(int(text), 0)
    except ProcessLookupError:
        return False
    except OSError:
        pass
    return True


def head_manifest(url: str, bucket: str, key: str) -> dict:
    """The manifest's HEAD; a missing one told apart from a missing bucket (a HEAD's 404 says neither)."""
    from botocore.exceptions import BotoCoreError, ClientError

    try:
        return client().head_object(Bucket=bucket, Key=key)
    except ClientError as e:
        if e.response.get("Error", {}).get("Code") not in ("404", "NoSuchKey"):
            raise failed(e, f"s3://{bucket}/{key}") from None
    except BotoCoreError as e:
        raise failed(e, url) from None
    try:
        client().head_bucket(Bucket=bucket)
    except ClientError as e:
        if e.response.get("Error", {}).get("Code") in ("404", "NoSuchBucket"):
            raise UserError(f"{url}: there is no bucket {bucket!r} there; check its name and AWS_ENDPOINT_URL") \
                from None
        raise failed(e, url) from None
    raise UserError(f"{url} holds no checkpoint (no {MANIFEST_NAME}); check the prefix, or save one there")


def check_empty(url: str) -> None:
    """The bucket exists and nothing is at the prefix: a save never mixes with another checkpoint."""
    bucket, prefix = split(url)
    listed = call(url, "list_objects_v2", Bucket=bucket, Prefix=prefix, MaxKeys=1)
    if listed.get("KeyCount", 0):
        raise UserError(f"{url} already holds objects; save to a new prefix (--replace is refused on s3://, "
                        "so that no reader ever mixes an old checkpoint's objects with a new one's)")


def upload_files(folder: Path, url: str, paths: list[str]) -> dict[str, str]:
    """The files `paths` of `folder` uploaded to `url` in parallel (multipart for large ones): their ETags."""
    from boto3.s3.transfer import TransferConfig

    bucket, prefix = split(url)
    # s3transfer's 8 MiB parts (raised by it where a file would need over 10,000): 64 MiB parts uploaded
    # 0.76x as fast as boto3's defaults on an H200 host (dev/results/s3-2026-12-01-h200)
    config = TransferConfig(max_concurrency=THREADS)

    def put(path: str) -> tuple[str, str]:
        where = f"{url.rstrip('/')}/{path}"
        from botocore.exceptions import BotoCoreError, ClientError

        try:
            client().upload_file(str(folder / path), bucket, prefix + path, Config=config)
        except (BotoCoreError, ClientError) as e:
            raise failed(e, where) from None
        except Exception as e:  # s3transfer wraps what went wrong
            raise UserError(f"{where}: the upload failed ({e}); no manifest was uploaded: save again") from None
        return path, call(where, "head_object", Bucket=bucket, Key=prefix + path)["ETag"]

    with ThreadPoolExecutor(4) as pool:  # each upload runs THREADS parts at once
        return dict(pool.map(put, paths))


def upload(folder: Path, url: str, elsewhere: dict[str, str] | None = None) -> Manifest:
    """The checkpoint in `folder` uploaded to `url`, then the manifest with every object's ETag, last;
    `elsewhere`: the ETags of files other nodes uploaded (checked there). A failure leaves no manifest."""
    bucket, prefix = split(url)
    elsewhere = elsewhere or {}
    manifest = read_manifest(folder)
    entries = manifest.entries()
    manifest.etags = {**upload_files(folder, url, [e.path for e in entries if e.path not in elsewhere]), **elsewhere}
    check_objects(objects(url, manifest, list(elsewhere)))  # there, of the size and ETag they were uploaded with
    where = f"{url.rstrip('/')}/{MANIFEST_NAME}"
    call(where, "put_object", Bucket=bucket, Key=prefix + MANIFEST_NAME, Body=manifest.to_json().encode())
    return manifest  # the folder's own manifest is left as it was


def hash_object(obj: S3Object, chunk: int = CHUNK) -> str:
    """The blake3 of an object, read in ranges (for --verify-hashes)."""
    import blake3

    digest = blake3.blake3(max_threads=blake3.blake3.AUTO)
    buffer = memoryview(bytearray(chunk))
    for offset in range(0, obj.size, chunk):
        view = buffer[: min(chunk, obj.size - offset)]
        obj.read_into(view, offset)
        digest.update(view)
    return digest.hexdigest()

