"""Our hand-written safetensors files: the safetensors library reads them
back exactly, their hash is the file's, and our reader reads them too."""

import torch
from safetensors.torch import load_file

from presharded.manifest import hash_file
from presharded.reader import Staging, load_files
from presharded.safetensors_layout import DTYPES, flat_bytes
from presharded.writer import write_file


def every_dtype() -> dict[str, torch.Tensor]:
    tensors = {f"t.{name}": (torch.randn(7, 13) * 50).to(dtype) for name, dtype in DTYPES.items()}
    tensors |= {"scalar": torch.tensor(3.5), "empty": torch.zeros(0, 4), "big": torch.randn(1000, 33)}
    return tensors


def test_written_files_read_back_exactly(tmp_path):
    tensors = every_dtype()
    path = tmp_path / "x.safetensors"
    buffers = [torch.empty(100, dtype=torch.uint8) for _ in range(2)]  # many chunks, split mid-tensor
    digest = write_file(path, tensors, buffers)
    assert digest == hash_file(path)
    back = load_file(path)
    assert list(back) == list(tensors)
    for name, t in tensors.items():
        assert back[name].dtype == t.dtype and torch.equal(flat_bytes(back[name]), flat_bytes(t))
    targets = {k: torch.empty_like(t) for k, t in tensors.items()}
    load_files([path], dict(targets), Staging(3, 256, torch.device("cpu")))
    assert all(torch.equal(flat_bytes(targets[k]), flat_bytes(t)) for k, t in tensors.items())
