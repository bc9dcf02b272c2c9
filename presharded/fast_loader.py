"""`fast_sharded_state`: reads the same files as vLLM's sharded_state, faster
(see presharded/reader.py for how)."""

import dataclasses
import json
import os
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from presharded.errors import UserError, refuses
from presharded.env import LOAD_REPORT_ENV
from presharded.formats import FAST_FORMAT
from presharded.load_checks import check_for_load
from presharded import s3
from presharded.manifest import default_pattern, read_manifest, render
from presharded.reader import File, Staging, load_files
from presharded.snapshot_weights import Refill, read_into
from presharded.vllm_compat import BaseModelLoader, parallel_ranks, parallel_sizes, unique_tensors


@dataclass
class LoadReport:
    """What one rank's load took; appended as a JSON line to the file named by
    $PRESHARDED_LOAD_REPORT, for the benchmark (and anyone) to read."""

    pp_rank: int
    tp_rank: int
    bytes: int
    seconds: float
    threads: int
    chunk_mib: int
    staging_wait: float  # of `seconds`, waiting for the staging buffers to be pinned
    staging_release: float  # of `seconds`, giving them back
    started: float  # wall clock (time.time()) when reading began: do ranks read at the same time?

    def line(self) -> str:
        return (f"{FAST_FORMAT}: rank pp={self.pp_rank} tp={self.tp_rank} read {self.bytes / 1e9:.3f} GB in "
                f"{self.seconds:.3f} s ({self.bytes / 1e9 / self.seconds:.2f} GB/s; {self.threads} threads, "
                f"{self.chunk_mib} MiB chunks; {self.staging_wait:.3f} s of it waiting for staging buffers and "
                f"{self.staging_release:.3f} s releasing them)")


class FastShardedStateLoader(BaseModelLoader):
    @refuses
    def __init__(self, load_config) -> None:
        super().__init__(load_config)
        extra = dict(load_config.model_loader_extra_config or {})
        self.threads = int(extra.pop("threads", 16))
        self.chunk_size = int(extra.pop("chunk_mib", 16)) * 2**20
        self.pattern = extra.pop("pattern", None)
        self.s3 = extra.pop("s3", None)  # the checkpoint's weights are there; its small files in the model folder
        if extra:
            raise UserError(f"unknown model_loader_extra_config keys for {FAST_FORMAT}: {sorted(extra)}; "
                            "it takes threads, chunk_mib, pattern and s3")
        # vLLM makes the loader in the worker right before it builds the model:
        # start pinning the staging buffers now, to be ready when the weights are read.
        self.staging = None
        if torch.cuda.is_available() and torch.cuda.is_initialized():
            self.staging = Staging(self.threads, self.chunk_size, torch.device("cuda", torch.cuda.current_device()))

    def download_model(self, model_config) -> None:
        pass  # a pre-sharded checkpoint is a local folder

    def rank_files(self, model_config) -> tuple[list[File], dict[str, str]]:
        """This rank's files of the checkpoint, and its aliases (tied weights saved once)."""
        folder = Path(model_config.model_weights or model_config.model)
        pp_size, tp_size = parallel_sizes()
        pp_rank, tp_rank = parallel_ranks()
        if self.s3:  # the load fetched the small files and checked the objects (presharded/s3.py)
            manifest = read_manifest(folder)
        else:
            manifest = check_for_load(folder, tensor_parallel_size=tp_size, pipeline_parallel_size=pp_size,
                                      rank=(pp_rank, tp_rank))
        aliases = manifest.aliases if manifest is not None else {}
        if self.s3:
            return s3.objects(self.s3, manifest, [s.path for s in manifest.shards_of([(pp_rank, tp_rank)])]), aliases
        if manifest is not None:
            return [folder / s.path for s in manifest.shards_of([(pp_rank, tp_rank)])], aliases
        pattern = self.pattern or default_pattern(pp_size)  # as vLLM's sharded_state finds them
        return sorted(folder.glob(render(pattern, pp_rank=pp_rank, tp_rank=tp_rank, part="*"))), aliases

    @refuses
    def load_weights(self, model: nn.Module, model_config) -> None:
        paths, aliases = self.rank_files(model_config)
        device = next(p.device for p in model.parameters() if not p.is_meta)
        materialize(model, device)
        params = unique_tensors(model.state_dict())
        # Saved once under another name, but separate in this model (vLLM untied them): filled from that name.
        tied = {name: params[name] for name, saved in aliases.items() if name in params and saved in params}
        self.read(paths, {name: p for name, p in params.items() if name not in tied}, device)
        for name, param in tied.items():
            param.copy_(params[aliases[name]])

    def refill(self, model: nn.Module, model_config, refill: Refill) -> None:
        """A snapshot's engine woken from sleep: its weights back as they were when it slept
        (presharded/snapshot_weights.py), from the checkpoint's files and the snapshot's kept file."""
        paths, _ = self.rank_files(model_config)
        if refill.path:
            paths.append(Path(model_config.model) / refill.path)
        params = unique_tensors(model.state_dict(), skip_views=True)
        self.read(paths, read_into(refill, params), next(iter(params.values())).device, refill.skip)

    def read(self, paths: list[File], params: dict[str, torch.Tensor], device: torch.device,
             skip: frozenset[str] = frozenset()) -> None:
        pp_rank, tp_rank = parallel_ranks()
        staging, self.staging = self.staging or Staging(self.threads, self.chunk_size, device), None
        start, started = time.perf_counter(), time.time()
        nbytes = load_files(paths, params, staging, skip)
        report = LoadReport(pp_rank, tp_rank, nbytes, time.perf_counter() - start, self.threads,
                            self.chunk_size >> 20, staging.waited, staging.released, started)
        print(report.line(), file=sys.stderr, flush=True)
        if path := os.environ.get(LOAD_REPORT_ENV):
            with open(path, "a") as f:
                f.write(json.dumps(dataclasses.asdict(report)) + "\n")


def materialize(model: nn.Module, device: torch.device) -> None:
    """Online quantization (`--quantization fp8` over bf16 weights) keeps a
    layer's weights on the meta device until loading fills them, and vLLM
    quantizes each such layer once loading ends: give them memory to be read into."""
    for module in model.modules():
        for name, tensor in [*module.named_parameters(recurse=False), *module.named_buffers(recurse=False)]:
            if tensor.is_meta:
                real = torch.empty_strided(tensor.size(), tensor.stride(), dtype=tensor.dtype, device=device)
                real.__class__ = tensor.__class__  # keep vLLM's parameter class and attributes
                real.__dict__ = tensor.__dict__.copy()
                setattr(module, name, real)
