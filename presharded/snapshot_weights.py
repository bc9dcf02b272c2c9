"""What a snapshot's engine needs back after sleep mode freed its weights
(presharded/snapshot.py). Freed are the bytes of every tensor the engine made
while it loaded: the weights, and what vLLM made of them after loading
(quantized weights repacked, matrices folded together). The checkpoint's own
files give back the tensors they hold exactly as the engine has them; the
rest is kept in the set, per rank, byte for byte, and read back with them.
Which is which is decided on the running engine, before it sleeps, by
comparing every tensor with the file."""

from collections.abc import Callable, Iterable
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors import safe_open
from torch import nn

PREFIX = "kept."  # the kept tensors' names, apart from the checkpoint's


@dataclass
class Refill:
    """How one rank's weights come back: `names` from the checkpoint's files (the rest of their
    tensors, `skip`, are not read), `kept` (whole storages, as bytes) from the file at `path`."""

    names: frozenset[str]
    skip: frozenset[str]
    kept: dict[str, torch.Tensor]
    path: str | None  # relative to the model folder; None when nothing is kept


def held(model: nn.Module, freed: Callable[[int], bool]) -> dict[str, torch.Tensor]:
    """The storages of the model's tensors (parameters, buffers, tensors kept as attributes of a module
    or of its quantization method) that sleep frees (`freed(address)`), each as one byte tensor over
    the whole storage, named after the first tensor found in it."""
    storages: dict[tuple[torch.device, int], tuple[str, torch.Tensor]] = {}
    for prefix, module in model.named_modules():
        for name, tensor in tensors_of(module):
            key = storage_key(tensor)
            if key not in storages and freed(key[1]):
                whole = torch.empty(0, dtype=torch.uint8, device=tensor.device).set_(tensor.untyped_storage())
                storages[key] = (f"{prefix}.{name}" if prefix else name, whole)
    return dict(storages.values())


def tensors_of(module: nn.Module) -> Iterable[tuple[str, torch.Tensor]]:
    owners = [vars(module), module._parameters, module._buffers]
    if (method := getattr(module, "quant_method", None)) is not None and hasattr(method, "__dict__"):
        owners.append(vars(method))
    for owner in owners:
        for name, value in owner.items():
            if isinstance(value, torch.Tensor) and value.untyped_storage().nbytes():
                yield name, value


def storage_key(tensor: torch.Tensor) -> tuple[torch.device, int]:
    return tensor.device, tensor.untyped_storage().data_ptr()


def refill_plan(params: dict[str, torch.Tensor], storages: dict[str, torch.Tensor], files: list[Path],
         path: str) -> Refill:
    """Which of `params` (the state dict, each storage once) the checkpoint's `files` give back exactly
    (same dtype, shape and bytes, the whole of its storage), and which of the freed `storages`
    nothing gives back: kept, to be written at `path`."""
    names, skip, given = set(), set(), set()
    for file in files:
        with safe_open(file, "pt", device="cpu") as f:
            for name in f.keys():
                tensor = params.get(name)
                if tensor is not None and whole(tensor) and same(f.get_tensor(name), tensor):
                    names.add(name)
                    given.add(storage_key(tensor))
                else:
                    skip.add(name)
    kept = {name: t for name, t in storages.items() if storage_key(t) not in given}
    return Refill(frozenset(names), frozenset(skip), kept, path if kept else None)


def whole(tensor: torch.Tensor) -> bool:
    return (tensor.is_contiguous() and tensor.storage_offset() == 0
            and tensor.nbytes == tensor.untyped_storage().nbytes())


def same(saved: torch.Tensor, tensor: torch.Tensor) -> bool:
    """Compared in host memory: the engine's GPU is full (its KV cache) while it is made."""
    return saved.dtype == tensor.dtype and saved.shape == tensor.shape and torch.equal(saved, tensor.cpu())


def read_into(refill: Refill, params: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Where each tensor of the checkpoint's files and of the kept file goes back to."""
    return {**{name: params[name] for name in refill.names}, **{PREFIX + k: t for k, t in refill.kept.items()}}


def kept_bytes(refill: Refill) -> int:
    return sum(t.nbytes for t in refill.kept.values())
