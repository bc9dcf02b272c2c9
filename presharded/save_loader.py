"""The load format that saves. Inside every worker it loads the source like
`auto`, then writes that rank's state as it is before
process_weights_after_loading: the logical weights, which loading and
post-processing again rebuild exactly, on every backend and quantization."""

import dataclasses
import os
import socket
import time
from pathlib import Path

import torch
from torch import nn

from presharded.errors import refuses
from presharded.save_messages import RankRecord, SaveRequest
from presharded.manifest import MANIFEST_NAME
from presharded.vllm_compat import (DefaultModelLoader, finish_online_quantization, online_quantized_layers,
                                    parallel_ranks, unique_tensors)
from presharded.writer import write_rank

_record: RankRecord | None = None  # what this worker wrote, until the save script asks


class SaveRecords:
    """Mixed into vLLM's workers (--worker-extension-cls): what the save script
    asks of each worker through the engine, wherever the worker runs."""

    def presharded_record(self) -> dict | None:
        return dataclasses.asdict(_record) if _record else None

    def presharded_manifest(self, text: str, nodes: list[int]) -> None:
        """The driver's manifest, into this worker's staging folder if its node
        keeps its own files (a disk of its own), for that node to publish."""
        if _record and _record.node in nodes:
            path = Path(_record.folder) / MANIFEST_NAME
            temporary = path.with_name(f".{MANIFEST_NAME}.{os.getpid()}")  # workers of one node write the same
            temporary.write_text(text)
            temporary.replace(path)


    def presharded_upload(self, url: str, nodes: list[int]) -> dict[str, str]:
        """With --output s3:// and a node that keeps its own files: this worker's rank uploaded from
        there, its ETags for the driver's manifest."""
        if not (_record and _record.node in nodes):
            return {}
        from presharded import s3

        return s3.upload_files(Path(_record.folder), url, [shard.path for shard in _record.shards])


class SavingModelLoader(DefaultModelLoader):
    def __init__(self, load_config) -> None:
        self.request, extra = SaveRequest.from_extra_config(load_config.model_loader_extra_config)
        source_config = dataclasses.replace(
            load_config,
            load_format=self.request.source_load_format,
            model_loader_extra_config=extra,
        )
        super().__init__(source_config)

    @refuses
    def load_weights(self, model: nn.Module, model_config) -> None:
        online = BeforeQuantization(model)
        super().load_weights(model, model_config)
        if online.layers:  # every layer quantized, each kept as it was just before
            finish_online_quantization(model, model_config)
        pp_rank, tp_rank = parallel_ranks()
        folder = Path(self.request.folder)
        start = time.perf_counter()
        state = model.state_dict()
        saved = online.logical_state(state)
        shards = write_rank(
            saved,
            folder,
            pattern=self.request.file_pattern,
            pp_rank=pp_rank,
            tp_rank=tp_rank,
            max_file_size=self.request.max_file_size,
        )
        global _record
        _record = RankRecord(
            shards=shards,
            dtype=str(model_config.dtype).removeprefix("torch."),
            quantization=model_config.quantization,
            architecture=model_config.hf_config.architectures[0],
            online_quantization=bool(online.layers),
            aliases=aliases(state, saved),
            write_seconds=time.perf_counter() - start,
            node=self.request.node,
            host=socket.gethostname(),
            folder=str(folder),
        )


def aliases(state: dict[str, torch.Tensor], saved: dict[str, torch.Tensor]) -> dict[str, str]:
    """Names left out of the files because they are a saved tensor under a
    second name (tied embeddings), each with the name it was saved under: a
    loader whose model unties them (vLLM 0.32 does, for every format but its
    own sharded ones) fills both."""
    def memory(t: torch.Tensor) -> tuple:
        return t.device, t.data_ptr(), t.shape, t.stride(), t.dtype

    by_memory = {memory(t): name for name, t in saved.items() if not t.is_meta}
    return {name: by_memory[memory(t)] for name, t in state.items()
            if name not in saved and not t.is_meta and memory(t) in by_memory}


class BeforeQuantization:
    """Keeps the weights of the layers vLLM quantizes while loading, as they are
    just before: what loading them again expects (vLLM then quantizes them again)."""

    def __init__(self, model: nn.Module) -> None:
        self.layers = online_quantized_layers(model)
        # Every path of each layer: a module registered twice (Qwen3-MoE's router gate, also under its
        # experts) is in the state under both, and a loader keeps the smallest name (vLLM's filter).
        self.paths: dict[int, list[str]] = {id(layer): [] for layer in self.layers.values()}
        for path, module in model.named_modules(remove_duplicate=False):
            if id(module) in self.paths:
                self.paths[id(module)].append(path)
        self.kept: dict[str, torch.Tensor] = {}
        self.methods = list({id(layer.quant_method): layer.quant_method for layer in self.layers.values()}.values())
        for method in self.methods:
            method.process_weights_after_loading = self.keeping(method.process_weights_after_loading)

    def keeping(self, process):
        def keep_then_process(layer: nn.Module) -> None:
            paths = self.paths[id(layer)]
            for name, tensor in layer.named_parameters(recurse=False):
                self.kept.setdefault(min(f"{path}.{name}" for path in paths), tensor.detach().cpu())
            return process(layer)

        return keep_then_process

    def logical_state(self, state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """The model's state to save: each tensor once, and every
        online-quantized layer's as it was just before vLLM quantized it.
        Stops keeping."""
        for method in self.methods:
            del method.process_weights_after_loading  # vLLM's own again
        kept, self.kept = self.kept, {}
        names = {name.rsplit(".", 1)[0] for name in kept}
        quantized = tuple(f"{path}." for paths in self.paths.values() if names & set(paths) for path in paths)
        if unloaded := sorted(k for k, t in state.items() if t.is_meta and not k.startswith(quantized)):
            raise RuntimeError(f"{unloaded[0]} was not loaded: its weights cannot be saved")
        rest = unique_tensors({k: t for k, t in state.items() if not k.startswith(quantized) and not t.is_meta})
        return {**rest, **kept}
