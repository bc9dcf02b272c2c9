"""What load_sharded_state.py does around vLLM's engine, step by step in the
order the script calls them: the checkpoint checked against its manifest
before vLLM is imported (for the ranks this node runs), the engine flags it
was saved for where the user set none, the start-up caches if they are
trusted, the engine's start and the request timed, the report. Across
several nodes (--nnodes) the other nodes only run their workers."""

import argparse
import json
import math
import shutil
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import TYPE_CHECKING

from presharded import progress
from presharded.engine_defaults import apply_engine_defaults
from presharded.engine_output import engine_refusals
from presharded.errors import UserError
from presharded.flags import AddFlags, engine_argv, fill_unset, parse_engine_flags, parse_for_checks
from presharded.formats import CHECKPOINT_FORMATS, FAST_FORMAT, SHARDED_STATE
from presharded.manifest import Manifest
from presharded.load_checks import check_for_load, saved_layout
from presharded.nodes import Liveness, Node
from presharded.shutdown import engine_dies_with_this_process, fail
from presharded.start_caches import CachesInUse, use_set

if TYPE_CHECKING:
    from presharded.snapshot_restore import Restore
from presharded.env import TRUST_ENV, TRUST_SNAPSHOT_ENV
from presharded.trust import TRUST_FLAG, TRUST_SNAPSHOT_FLAG


def add_checkpoint_flags(parser: argparse.ArgumentParser) -> None:
    """Our flags of a load, beside vLLM's engine flags."""
    parser.add_argument("--verify-hashes", action="store_true",
                        help="hash every file against the manifest before loading")
    parser.add_argument("--no-start-caches", dest="start_caches", action="store_false",
                        help="start without the checkpoint's start-up caches (presharded-caches)")
    parser.add_argument(TRUST_FLAG, dest="trust_start_caches", action="store_true",
                        help="use the checkpoint's start-up caches though this user did not make them here: "
                        f"they hold compiled code that will run (or {TRUST_ENV}=1)")
    parser.add_argument("--prefetch", action="store_true",
                        help="read this node's weights into the page cache while vLLM imports")
    parser.add_argument("--snapshot", action="store_true",
                        help="restore the checkpoint's engine snapshot (presharded-snapshot) instead of starting "
                        "vLLM, if it matches this machine and these engine flags")
    parser.add_argument(TRUST_SNAPSHOT_FLAG, dest="trust_snapshot", action="store_true",
                        help="restore the checkpoint's engine snapshot though this user did not make it here: "
                        f"it is a whole process that will run (or {TRUST_SNAPSHOT_ENV}=1)")


class Load:
    """One load, from the checks made before vLLM is imported to the report: made by `Load.check`
    (the constructor keeps what it is given); each step the script calls fills in what it learns."""

    def __init__(self, argv: list[str], add_flags: AddFlags, doc: str, early: argparse.Namespace, node: Node,
                 nodes: Liveness | None, started: float) -> None:
        self.argv, self.add_flags, self.doc, self.early = argv, add_flags, doc, early
        self.node, self.nodes, self.started = node, nodes, started  # nodes: with --nnodes, each watching the others
        self.s3: str | None = None  # an s3:// checkpoint: its small files fetched into a folder here
        self.manifest: Manifest | None = None
        self.layout: dict = {}  # the engine settings it was saved for
        self.prefetching = False
        self.caches = CachesInUse("none", Path(str(early.model)), {})
        self.snapshot: Restore | None = None  # with --snapshot: what became of the restore
        self.image = None  # --image: its pixels (PIL), read before vLLM is imported
        self.args: argparse.Namespace | None = None  # every engine flag, once vLLM is imported
        self.seconds: dict[str, float] = {}

    @classmethod
    def check(cls, argv: list[str], add_flags: AddFlags, doc: str) -> "Load":
        """Before vLLM is imported: the flags the checks need parsed, the request and the checkpoint
        (the ranks this node runs) checked, reading ahead started if asked; across nodes, every node
        agreeing on what it runs."""
        started = time.perf_counter()
        early = parse_for_checks(argv, add_flags, doc)
        if early.model is None:
            raise UserError("--model is required: a checkpoint folder from save_sharded_state.py")
        check_sampling(early)
        progress.decide(quiet=getattr(early, "json", True))  # the runner's output is JSON too
        node = Node.from_args(early)
        nodes = Liveness(node, "the load", fail) if node.count > 1 else None  # a dead node ends all
        load = cls(argv, add_flags, doc, early, node, nodes, started)
        load.image = read_image(early.image) if getattr(early, "image", None) else None
        load.check_checkpoint()
        if nodes:  # every node runs the same checkpoint and layout, or none starts
            nodes.agree({"checkpoint": load.manifest.id if load.manifest else early.model,
                         "load_format": early.load_format or SHARDED_STATE,
                         "tensor_parallel_size": load.layout_of("tensor_parallel_size"),
                         "pipeline_parallel_size": load.layout_of("pipeline_parallel_size")})
        load.seconds["checks"] = round(time.perf_counter() - started, 3)
        return load

    def check_checkpoint(self) -> None:
        """The checkpoint against its manifest (an s3:// one's small files fetched first, its weights
        checked there); the layout it was saved for; with --prefetch, this node's weights read ahead."""
        early = self.early
        if str(early.model).startswith("s3://"):  # the small files fetched here, the weights read from there
            from presharded import s3

            if (early.load_format or FAST_FORMAT) != FAST_FORMAT:
                raise UserError(f"an s3:// checkpoint loads with --load-format {FAST_FORMAT}: vLLM's "
                                f"{early.load_format} reads only folders")
            self.s3, early.load_format, early.model = early.model, FAST_FORMAT, str(s3.fetch(early.model))
            self.caches = CachesInUse("none", Path(early.model), {})
        load_format = early.load_format or SHARDED_STATE
        if load_format not in CHECKPOINT_FORMATS:
            return
        try:
            self.manifest = check_for_load(Path(early.model), tensor_parallel_size=early.tensor_parallel_size,
                                           pipeline_parallel_size=early.pipeline_parallel_size,
                                           verify_hashes=early.verify_hashes, load_format=load_format,
                                           node=self.node, s3_url=self.s3)  # of the ranks this node runs
        except UserError:
            if self.s3:  # nothing of a refused checkpoint is kept
                shutil.rmtree(early.model, ignore_errors=True)
            raise
        self.layout = saved_layout(Path(early.model), self.manifest)
        if early.prefetch and self.manifest is not None and not self.s3:  # presharded/prefetch.py
            from presharded import prefetch

            ranks = self.node.ranks(self.manifest.tensor_parallel_size, self.manifest.pipeline_parallel_size)
            files = [Path(early.model) / s.path for s in self.manifest.shards_of(ranks)]
            self.prefetching = prefetch.read_ahead(files) is not None

    def layout_of(self, dest: str):
        """A layout flag as given, or as the checkpoint was saved."""
        return getattr(self.early, dest) or (getattr(self.manifest, dest) if self.manifest else None)

    def from_snapshot(self, request: dict | None = None):
        """With --snapshot: the engine restored from the checkpoint's snapshot, asked `request`
        (prompt, max_tokens, temperature, top_p; by default the flags'), the rank's weights read into
        the page cache once its image is (the image first: the restore waits for all of it); None
        (one warning) when it cannot be: vLLM then starts as usual."""
        early = self.early
        if not getattr(early, "snapshot", False):
            return None
        if self.manifest is None or self.node.count > 1 or self.image is not None:
            print("warning: not restoring an engine snapshot: it needs a checkpoint with a manifest, on one "
                  "node, and a prompt without --image; starting vLLM instead", file=sys.stderr)
            return None
        from presharded import prefetch, snapshot_restore

        def read_weights_ahead() -> None:  # once the image is read: the weights, for the refill after the wake
            if not self.prefetching and not self.s3:  # in S3 the refill reads them by ranged GETs
                weights = [Path(early.model) / s.path for s in self.manifest.shards]
                self.prefetching = prefetch.read_ahead(weights) is not None

        request = request or {k: getattr(early, k) for k in ("prompt", "max_tokens", "temperature", "top_p")}
        self.snapshot = snapshot_restore.restore(Path(early.model), self.manifest,
                                                 engine_argv(self.argv, self.add_flags), request, early.trust_snapshot,
                                                 image_ready=read_weights_ahead, s3_url=self.s3)
        if self.snapshot.used:
            early.load_format = FAST_FORMAT
            early.tensor_parallel_size = self.manifest.tensor_parallel_size
            early.pipeline_parallel_size = self.manifest.pipeline_parallel_size
            self.args = early
            self.seconds.update(self.snapshot.seconds)
            self.seconds["total"] = round(time.perf_counter() - self.started, 3)
        return self.snapshot.output

    def engine_flags(self) -> argparse.Namespace:
        """Once vLLM is imported: every engine flag, those unset as the checkpoint was saved
        (layout, dtype, quantization), workable defaults on CPU; vLLM's engine will end
        with this script, however it ends."""
        self.seconds["import"] = round(time.perf_counter() - self.started - self.seconds["checks"], 3)
        args, parser = parse_engine_flags(self.argv, self.add_flags, self.doc, {"load_format": SHARDED_STATE})
        fill_unset(args, parser, self.layout)
        if self.s3:
            args.model, args.load_format = self.early.model, FAST_FORMAT
            args.model_loader_extra_config = {**(args.model_loader_extra_config or {}), "s3": self.s3}
        apply_engine_defaults(args, parser, saving=False)
        engine_dies_with_this_process()
        self.args = args
        return args

    def run_workers(self, engine_args) -> None:
        """On a node that is not the driver: its workers serve the driver's engine until it ends."""
        from presharded.vllm_compat import run_workers

        with engine_refusals():
            run_workers(engine_args, self.nodes.wait_for_driver)
        print(f"{self.node}: the driver's engine has ended", file=sys.stderr)

    def use_start_caches(self, args: argparse.Namespace) -> None:
        """What an earlier start compiled, kept in the checkpoint, if it matches this machine and
        is trusted: vLLM then starts on a link to the checkpoint beside those caches."""
        if args.start_caches and self.manifest is not None and self.node.count == 1:
            self.caches = use_set(Path(args.model), self.manifest, args.tensor_parallel_size,
                                  args.pipeline_parallel_size, args.trust_start_caches)
            args.model = str(self.caches.model)

    @contextmanager
    def engine_start(self) -> Iterator[None]:
        """Around building the engine: a refusal of ours inside it ends the script in one line."""
        start = time.perf_counter()
        with engine_refusals():
            yield
        self.seconds["engine"] = round(time.perf_counter() - start, 3)

    @contextmanager
    def request(self) -> Iterator[None]:
        """Around generating: vLLM checks the prompt against the context only here."""
        from presharded.vllm_compat import REQUEST_ERRORS, is_image_error, is_request_error

        start = time.perf_counter()
        try:
            yield
        except REQUEST_ERRORS as e:
            if is_image_error(e):
                fix = "put the model's image placeholder in --prompt where the image goes, e.g. <image>"
            elif is_request_error(e):
                fix = "--prompt, --max-tokens, --max-model-len"
            else:
                fix = "vLLM raised it running the model on the first request"
            raise UserError(f"{str(e).splitlines()[0]} ({fix})") from None
        self.seconds["generate"] = round(time.perf_counter() - start, 3)
        self.seconds["total"] = round(time.perf_counter() - self.started, 3)
        if self.nodes:
            self.nodes.finish()
        self.caches.finish()  # whether the start, first request included, compiled anything

    def result(self) -> dict:
        args = self.args
        return {"load_format": args.load_format, "tensor_parallel_size": args.tensor_parallel_size,
                "pipeline_parallel_size": args.pipeline_parallel_size, "caches": self.caches.status,
                "snapshot": self.snapshot.report() if self.snapshot else {"used": False}, "seconds": self.seconds}

    def report(self, output) -> None:
        """The generated text (or JSON, with --json) on stdout."""
        if self.args.json:
            print(json.dumps({"text": output.text, "token_ids": list(output.token_ids), **self.result()}))
            return
        print(printable(output.text))
        print(f"token ids: {list(output.token_ids)}")
        used = f" · engine snapshot {self.snapshot.set}" if self.snapshot and self.snapshot.used else ""
        print(" · ".join(f"{k} {v:.2f} s" for k, v in self.seconds.items()) + f" · start-up caches: {self.caches.status}"
              + used)


def check_sampling(args: argparse.Namespace) -> None:
    for prompt in getattr(args, "prompts", None) or [getattr(args, "prompt", "")]:
        prompt = prompt["prompt"] if isinstance(prompt, dict) else prompt  # presharded.generate's, with an image
        try:
            prompt.encode()
        except UnicodeEncodeError as e:  # Python keeps bytes that are not UTF-8 as lone surrogates
            byte = ord(prompt[e.start]) & 0xFF
            raise UserError(f"--prompt is not UTF-8 text (byte 0x{byte:02x} at character {e.start}); pass UTF-8 text")
    if args.max_tokens < 1:
        raise UserError(f"--max-tokens {args.max_tokens}: generate at least 1 token")
    temperature = getattr(args, "temperature", 0.0)
    if not (math.isfinite(temperature) and temperature >= 0):
        raise UserError(f"--temperature {temperature}: use 0 (greedy) or more, a finite number")
    if not 0 < getattr(args, "top_p", 1.0) <= 1:  # nan fails it too
        raise UserError(f"--top-p {args.top_p}: use a value above 0, at most 1")


def read_image(path: str | Path):
    """--image: its pixels as RGB (a PIL image), for vLLM's multi-modal input."""
    from PIL import Image

    try:
        with Image.open(path) as image:
            return image.convert("RGB")
    except (OSError, ValueError, Image.DecompressionBombError) as e:  # UnidentifiedImageError is an OSError
        reason = getattr(e, "strerror", None) or (str(e).splitlines() or [type(e).__name__])[0]
        raise UserError(f"cannot read --image {path} ({reason}); pass an image file (PNG, JPEG, ...)") from None


def printable(text: str) -> str:
    """The text with control characters escaped (a random model makes plenty)."""
    return "".join(c if c.isprintable() or c in "\n\t" else repr(c)[1:-1] for c in text)
