"""Architectures beyond the tiny Llama: each a toy-sized model of a real
architecture's config (presharded/tiny.py), saved at TP=1 and TP=2, loaded
with vLLM's sharded_state and with fast_sharded_state, gives the greedy
tokens that auto gives on the source. The engines of one layout run one
after another in one process, to spare an import of vLLM each."""

import functools
import json
import subprocess
import sys
from pathlib import Path

import pytest

from conftest import ROOT, save, script_env
from presharded.formats import FAST_FORMAT, SHARDED_STATE
from presharded.tiny import ARCHITECTURES, build_tiny

ARCHS = [arch for arch in ARCHITECTURES if arch not in ("llama", "llama-tied")]  # those: test_round_trip.py
PROMPTS = ["The quick brown fox", "A pre-sharded checkpoint is"]
GREEDY = """
import gc, json, sys
from vllm import LLM, EngineArgs, SamplingParams
from presharded.cli import apply_engine_defaults, full_parse
from presharded.verify_tokens import add_flags

runs, flags = json.loads(sys.argv[1]), sys.argv[2:]
tokens = []
for model, load_format in runs:
    args, parser = full_parse(["--model", model, "--load-format", load_format, "--prompts", "[]", *flags],
                              add_flags, "")
    apply_engine_defaults(args, parser, saving=False)
    llm = LLM.from_engine_args(EngineArgs.from_cli_args(args))
    outputs = llm.generate(%r, SamplingParams(temperature=0.0, max_tokens=12), use_tqdm=False)
    tokens.append([list(o.outputs[0].token_ids) for o in outputs])
    del llm, outputs
    gc.collect()
print(json.dumps(tokens))
""" % PROMPTS


def greedy(runs: list[tuple[Path, str]], *flags: str, world_size: int) -> list[list[list[int]]]:
    """Greedy tokens on PROMPTS from each (model, load format), in one process."""
    proc = subprocess.run([sys.executable, "-c", GREEDY, json.dumps([(str(m), f) for m, f in runs]),
                           "--enforce-eager", *flags],
                          cwd=ROOT, env=script_env(world_size), capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stderr[-4000:]
    return json.loads(proc.stdout.strip().splitlines()[-1])


@pytest.fixture(scope="module")
def source(tmp_path_factory):
    root = tmp_path_factory.mktemp("architectures")
    return functools.cache(lambda arch: build_tiny(root / arch, arch, num_layers=2))


@pytest.mark.parametrize("tp", [1, 2], ids=["tp1", "tp2"])
@pytest.mark.parametrize("arch", ARCHS)
def test_round_trip_per_architecture(source, tmp_path, arch, tp):
    model = source(arch)
    checkpoint = save(model, tmp_path / "ckpt", tp=tp)
    flags = ["-tp", str(tp)]
    auto, sharded, fast = greedy([(model, "auto"), (checkpoint, SHARDED_STATE), (checkpoint, FAST_FORMAT)], *flags,
                                 world_size=tp)
    assert sharded == auto, f"{arch} at TP={tp}: sharded_state differs from auto"
    assert fast == auto, f"{arch} at TP={tp}: fast_sharded_state differs from auto"


def test_expert_parallel_save(source, tmp_path):
    model = source("qwen3-moe")
    checkpoint = save(model, tmp_path / "ckpt", "--enable-expert-parallel", tp=2)
    assert json.loads((checkpoint / "presharded.json").read_text())["enable_expert_parallel"] is True
    assert sorted(p.name for p in checkpoint.glob("*.safetensors")) == [
        "model-rank-0-part-0.safetensors", "model-rank-1-part-0.safetensors"]
    pytest.skip("saved; loading is not compared: on vLLM 0.32's CPU build the source itself (auto) dies in its "
                "first step with --enable-expert-parallel at TP=2 (EngineDeadError: cancelled)")


def test_pipeline_stages_round_trip(source, tmp_path):
    model = source("qwen2")
    checkpoint = save(model, tmp_path / "ckpt", tp=1, pp=2)
    auto, sharded, fast = greedy([(model, "auto"), (checkpoint, SHARDED_STATE), (checkpoint, FAST_FORMAT)],
                                 "-pp", "2", world_size=2)
    assert sharded == auto and fast == auto

