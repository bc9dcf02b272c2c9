"""fast_sharded_state, our loader: the same tokens as auto, offline and
through vLLM's OpenAI server; exact shapes or a clear refusal."""

import os
import random
import shutil
import subprocess
import sys

import pytest
import torch
from safetensors.torch import save_file

from conftest import ROOT, free_port, left_in_dev_shm, link_weight_out, refused, script_env
from presharded.errors import UserError
from presharded.formats import FAST_FORMAT
from presharded.reader import Staging, load_files
from presharded.safetensors_layout import Segment, chunks


def test_chunks_cover_every_byte_once():
    rng = random.Random(0)
    for _ in range(200):
        segments, pos = [], 8
        for n in (rng.randint(1, 50) for _ in range(rng.randint(1, 20))):
            segments.append(Segment(pos, pos + n, torch.zeros(n, dtype=torch.uint8)))
            pos += n
        chunk_size = rng.randint(1, 60)
        source = (torch.arange(pos) % 251).to(torch.uint8)
        for lo, hi, parts in chunks(segments, chunk_size):
            assert 0 < hi - lo <= chunk_size and parts[0].start == lo and parts[-1].end == hi
            assert lo // chunk_size == (hi - 1) // chunk_size  # within one aligned block: no shared pages
            for p in parts:
                p.tensor.copy_(source[p.start : p.end])
        for s in segments:
            assert torch.equal(s.tensor, source[s.start : s.end])


def test_load_files_reads_exact_tensors_refuses_other_shapes_and_always_releases_staging(tmp_path):
    tensors = {"a": torch.randn(300, 7), "b": torch.arange(1000, dtype=torch.int64), "c": torch.randn(5).bfloat16()}
    path = tmp_path / "x.safetensors"
    save_file(tensors, path)
    params = {k: torch.empty_like(v) for k, v in tensors.items()}
    targets, staging = dict(params), Staging(3, 1000, torch.device("cpu"))
    assert load_files([path], params, staging) > 0
    assert all(torch.equal(targets[k], tensors[k]) for k in tensors)
    assert staging.area is None  # unmapped
    staging = Staging(2, 1000, torch.device("cpu"))
    with pytest.raises(UserError, match=r"a is F32\[300, 7\], the model expects torch.float32\[150, 7\]"):
        load_files([path], {"a": torch.empty(150, 7), "b": torch.empty(1000, dtype=torch.int64),
                   "c": torch.empty(5).bfloat16()}, staging)
    assert staging.area is None
    path.write_bytes(path.read_bytes()[:-100])  # the tensor table now points past the end: refused before reading
    with pytest.raises(UserError, match="x.safetensors: .'s bytes do not lie inside the file"):
        load_files([path], {k: torch.empty_like(v) for k, v in tensors.items()}, Staging(2, 1000, torch.device("cpu")))


def test_fast_loader_round_trip_tp2(tp2_loads):
    loads = tp2_loads()  # in the process of the TP=2 reference (conftest.py)
    assert (loads[FAST_FORMAT]["load_format"], loads[FAST_FORMAT]["tensor_parallel_size"]) == (FAST_FORMAT, 2)
    assert loads[FAST_FORMAT]["token_ids"] == loads["auto"]["token_ids"]


def test_a_refusal_inside_the_engine_is_one_line(checkpoints):
    # In an engine process of its own: the worker refusal at TP=2 and under vLLM's server, below.
    line = refused("fast_sharded_state: an unknown loader option (engine in-process)",
                   "load_sharded_state.py", "--model", str(checkpoints(1, 1)), "--load-format", FAST_FORMAT,
                   "--model-loader-extra-config", '{"bogus": 1}', "--enforce-eager", within=None)
    assert "unknown model_loader_extra_config keys for fast_sharded_state: ['bogus']" in line


def test_a_worker_refusal_at_tp2_is_one_line(checkpoints, tmp_path):
    """Without a manifest nothing is checked before the engine: rank 1's loader finds a tensor of another shape."""
    checkpoint = shutil.copytree(checkpoints(2, 1), tmp_path / "tp2")
    (checkpoint / "presharded.json").unlink()
    path = checkpoint / "model-rank-1-part-0.safetensors"
    data = path.read_bytes()
    length = int.from_bytes(data[:8], "little")
    header = data[8 : 8 + length].decode().replace('"shape":[128,128]', '"shape":[256, 64]', 1)
    path.write_bytes(data[:8] + header.encode() + data[8 + length :])
    shared_before = set(os.listdir("/dev/shm"))
    # Every process of the engine holds the script's stderr and writes to it without pause once rank 1
    # has refused (tests/chatter/sitecustomize.py): the error line must still be the last.
    line = refused("fast_sharded_state: a tensor of another shape, found by rank 1 inside the engine",
                   "load_sharded_state.py", "--model", str(checkpoint), "--load-format", FAST_FORMAT,
                   "--enforce-eager", within=None, world_size=2, env={"PYTHONPATH": str(ROOT / "tests" / "chatter")},
                   engine_process=True)
    assert "the model expects" in line and "load with the layout, dtype and quantization it was saved for" in line
    left = left_in_dev_shm(shared_before)
    assert not left, f"the failed engine left {left} in /dev/shm"


def test_the_loader_under_vllms_server_refuses_a_path_that_leads_out(checkpoints, tmp_path):
    """`vllm serve` with our loader: no script checked the checkpoint first. The plugin, in every vLLM
    process: tracebacks leave vLLM's log once we refused; the server's last line is ours, exit 1.
    (Python's multiprocessing still prints the engine process's own traceback.)"""
    ckpt = shutil.copytree(checkpoints(1, 1), tmp_path / "ckpt")
    link_weight_out(ckpt)
    proc = subprocess.run(
        [sys.executable, "-m", "vllm.entrypoints.openai.api_server", "--model", str(ckpt),
         "--load-format", FAST_FORMAT, "--enforce-eager", "--host", "127.0.0.1", "--port", str(free_port())],
        cwd=ROOT, env=dict(script_env(1, engine_process=True), VLLM_CPU_KVCACHE_SPACE="1"), capture_output=True,
        text=True, timeout=300)
    lines = proc.stderr.strip().splitlines()
    assert proc.returncode == 1 and lines[-1].startswith("error: "), proc.stderr[-3000:]
    assert "leads out of the checkpoint" in lines[-1]
    assert proc.stderr.count("Traceback") <= 1, proc.stderr[-3000:]
    assert f'File "{ROOT / "presharded"}' not in proc.stderr, proc.stderr[-3000:]  # no frames of ours
