"""What a snapshot's engine gets back after sleep mode freed its weights
(presharded/snapshot_weights.py), on the CPU with real tensors and files: what
vLLM made of the loaded weights (a weight repacked, a matrix derived from
another) is kept byte for byte, the rest comes from the checkpoint's files,
and the two read back give every byte the engine had. The GPU runs
(dev/results/snapshot-*) prove it inside a restored engine."""

import pytest
import torch
from safetensors.torch import save_file
from torch import nn

from presharded.reader import Staging, load_files
from presharded.snapshot_weights import held, read_into, refill_plan
from presharded.writer import write_file


class Processed(nn.Module):
    """Two layers as a checkpoint holds them; then, as vLLM's processing after loading does, one weight
    repacked (another dtype and layout) and a matrix derived and kept as a plain attribute."""

    def __init__(self) -> None:
        super().__init__()
        self.a = nn.Linear(16, 32, bias=True)
        self.b = nn.Linear(32, 16, bias=False)
        self.register_buffer("cache", torch.randn(8), persistent=False)

    def process(self) -> None:
        self.b.weight = nn.Parameter(self.b.weight.detach().to(torch.float16).t(), requires_grad=False)
        self.a.folded = self.a.weight.detach() @ self.a.weight.detach().t()


def test_what_the_checkpoint_cannot_give_back_is_kept_and_every_byte_comes_back(tmp_path):
    model = Processed()
    checkpoint = tmp_path / "rank.safetensors"
    save_file({k: t.contiguous() for k, t in model.state_dict().items()}, checkpoint)
    model.process()
    params = dict(model.state_dict())
    storages = held(model, lambda address: True)
    refill = refill_plan(params, storages, [checkpoint], "snapshots/S/weights/rank-pp0-tp0.safetensors")

    assert refill.names == {"a.weight", "a.bias"}  # as the checkpoint holds them
    assert refill.skip == {"b.weight"}  # repacked: not read from the checkpoint
    assert set(refill.kept) == {"b.weight", "a.folded", "cache"}
    before = {name: t.clone() for name, t in storages.items()}

    kept = tmp_path / "kept.safetensors"
    buffers = [torch.empty(1 << 10, dtype=torch.uint8) for _ in range(2)]
    write_file(kept, {f"kept.{k}": t for k, t in refill.kept.items()}, buffers)
    for t in storages.values():  # asleep: the memory is given back; awake again, it holds anything
        t.fill_(0xA5)
    load_files([checkpoint, kept], read_into(refill, params), Staging(2, 1 << 12, torch.device("cpu")), refill.skip)
    assert all(torch.equal(storages[name], before[name]) for name in storages)
    assert model.b.weight.dtype == torch.float16 and model.a.folded.shape == (32, 32)


def test_the_checkpoint_gives_back_only_what_is_the_same_and_whole(tmp_path):
    model = nn.Linear(4, 4)
    checkpoint = tmp_path / "rank.safetensors"
    save_file({"weight": model.weight.detach().clone(), "bias": model.bias.detach() + 1}, checkpoint)
    storages = held(model, lambda address: True)
    refill = refill_plan(dict(model.state_dict()), storages, [checkpoint], "w")
    assert refill.names == {"weight"} and refill.skip == {"bias"} and set(refill.kept) == {"bias"}
    nothing_freed = refill_plan(dict(model.state_dict()), held(model, lambda address: False), [checkpoint], "w")
    assert nothing_freed.kept == {} and nothing_freed.path is None


class LowRank(nn.Module):
    """As vLLM's MLA attention after loading (DeepSeek-V2): kv_b_proj's weight made into one new matrix and
    kept as two views of it, W_UK_T and W_UV, neither contiguous, registered beside the loaded weight."""

    def __init__(self) -> None:
        super().__init__()
        self.kv_b_proj = nn.Linear(8, 24, bias=False)

    def process(self) -> None:
        w = self.kv_b_proj.weight.detach().t().reshape(8, 2, 12).clone()
        uk, uv = w.split([4, 8], dim=2)
        self.W_UK_T = nn.Parameter(uk.permute(1, 2, 0), requires_grad=False)
        self.W_UV = nn.Parameter(uv.transpose(0, 1), requires_grad=False)


def test_views_of_one_matrix_come_back_from_the_kept_bytes(tmp_path):
    """MLA's engine snapshot on vLLM 0.26 ended at `W_UV ... is a non-contiguous view of another tensor: it
    cannot be saved` (dev/results/architectures-2026-12-07-h100-b): true of a save, not of a snapshot."""
    from presharded.vllm_compat import unique_tensors  # imports vLLM's loader

    model = LowRank()
    checkpoint = tmp_path / "rank.safetensors"
    save_file({k: t.contiguous() for k, t in model.state_dict().items()}, checkpoint)
    model.process()
    with pytest.raises(RuntimeError, match="W_UK_T .* non-contiguous view of another tensor: it cannot be saved"):
        unique_tensors(model.state_dict())
    params = unique_tensors(model.state_dict(), skip_views=True)
    assert set(params) == {"kv_b_proj.weight"}
    storages = held(model, lambda address: True)
    refill = refill_plan(params, storages, [checkpoint], "kept")
    assert refill.names == {"kv_b_proj.weight"} and set(refill.kept) == {"W_UK_T"}  # the matrix's memory, once
    before = (model.W_UK_T.clone(), model.W_UV.clone())

    kept = tmp_path / "kept.safetensors"
    buffers = [torch.empty(1 << 10, dtype=torch.uint8) for _ in range(2)]
    write_file(kept, {f"kept.{k}": t for k, t in refill.kept.items()}, buffers)
    for t in storages.values():
        t.fill_(0xA5)
    load_files([checkpoint, kept], read_into(refill, params), Staging(2, 1 << 12, torch.device("cpu")), refill.skip)
    assert torch.equal(model.W_UK_T, before[0]) and torch.equal(model.W_UV, before[1])
