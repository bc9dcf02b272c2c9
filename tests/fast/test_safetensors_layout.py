"""Our hand-written safetensors files: the safetensors library reads them
back exactly, their hash is the file's, and our reader reads them too."""

import json

import pytest
import torch
from safetensors.torch import load_file

from presharded.errors import UserError
from presharded.manifest import hash_file
from presharded.reader import Staging, load_files
from presharded.safetensors_layout import DTYPES, flat_bytes, read_header
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


@pytest.mark.parametrize("damage", ["length past the end", "length of 2**63", "offsets past the end",
                                    "offsets reversed", "table not an object", "table nested deeply"])
def test_a_hostile_tensor_table_is_refused_in_one_line(tmp_path, damage):
    """A weight file is untrusted too: its header is read in bounded memory and every
    tensor's bytes must lie inside the file, before anything is read through it."""
    path = tmp_path / "w.safetensors"
    write_file(path, {"w": torch.zeros(4)}, [torch.empty(64, dtype=torch.uint8)] * 2)
    data = bytearray(path.read_bytes())
    length = int.from_bytes(data[:8], "little")
    table = json.loads(data[8 : 8 + length])
    if damage == "length past the end":
        data[:8] = (len(data) + 1).to_bytes(8, "little")
    elif damage == "length of 2**63":
        data[:8] = (2**63).to_bytes(8, "little")
    else:
        if damage == "offsets past the end":
            table["w"]["data_offsets"] = [0, 10**12]
        elif damage == "offsets reversed":
            table["w"]["data_offsets"] = [16, 0]
        body = (json.dumps(table) if damage.startswith("offsets") else
                "[1]" if damage == "table not an object" else "[" * 100000 + "]" * 100000).encode()
        data = bytearray(len(body).to_bytes(8, "little") + body + data[8 + length :])
    path.write_bytes(bytes(data))
    with pytest.raises(UserError, match="w.safetensors"):
        read_header(path)
