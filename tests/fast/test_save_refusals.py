"""Bad input to save_sharded_state.py: one line naming the problem and the
fix, exit 1, and nothing lost: the source is unchanged, and no folder is left
that a load would accept. These are refused before vLLM is imported (those
that need vLLM's engine: tests/test_engine_refusals.py)."""

import shutil
import subprocess
import sys

import pytest

from conftest import ROOT, nothing_left, refused, small_filesystem, snapshot

SAVE = "save_sharded_state.py"


@pytest.fixture
def source(tiny_model):
    """The tiny model, checked unchanged after the test."""
    before = snapshot(tiny_model)
    yield tiny_model
    assert snapshot(tiny_model) == before


def test_missing_model_path(tmp_path):
    line = refused("save: --model path that does not exist", SAVE, "--model", str(tmp_path / "nope"),
                   "--output", str(tmp_path / "out"))
    assert "is not a folder or a hub id" in line
    nothing_left(tmp_path / "out")


def test_model_folder_without_weights(source, tmp_path):
    empty = tmp_path / "no-weights"
    empty.mkdir()
    shutil.copy(source / "config.json", empty)
    line = refused("save: a model folder with no weights", SAVE, "--model", str(empty),
                   "--output", str(tmp_path / "out"))
    assert "holds no weights" in line
    nothing_left(tmp_path / "out")


def test_output_inside_source(source):
    line = refused("save: --output inside the source model", SAVE, "--model", str(source),
                   "--output", str(source / "sharded"))
    assert "is inside the source model" in line
    assert not (source / "sharded").exists()


def test_output_not_empty(source, tmp_path):
    output = tmp_path / "out"
    output.mkdir()
    (output / "keep.txt").write_text("mine")
    line = refused("save: --output exists and is not empty", SAVE, "--model", str(source), "--output", str(output))
    assert "is not empty" in line and "--replace" in line
    assert snapshot(output) == {"keep.txt": snapshot(output)["keep.txt"]} and (output / "keep.txt").read_text() == "mine"


def test_unwritable_output(source, tmp_path):
    with small_filesystem(tmp_path / "ro", "1m", "ro") as ro:
        line = refused("save: --output on a read-only filesystem", SAVE, "--model", str(source),
                       "--output", str(ro / "out"))
        assert "cannot write to" in line
        assert list(ro.iterdir()) == []


def test_colliding_file_pattern(source, tmp_path):
    line = refused("save: --file-pattern without a rank, at TP=2", SAVE, "--model", str(source),
                   "--output", str(tmp_path / "out"), "-tp", "2", "--file-pattern", "model-{part}.safetensors")
    assert "must contain {rank} or {tp_rank}" in line
    nothing_left(tmp_path / "out")


def test_replace_never_deletes_the_source(source, tmp_path):
    # Seen: --output a folder that holds the source, with --replace, deleted the source (and all beside it).
    home = tmp_path / "x"
    shutil.copytree(source, home / "hf")
    (home / "notes.txt").write_text("mine")
    line = refused("save: --output holds the source model (--replace)", SAVE, "--model", str(home / "hf"),
                   "--output", str(home), "--replace", unchanged=home)
    assert "holds the source model" in line


def test_replace_only_replaces_a_checkpoint(source, tmp_path):
    output = tmp_path / "mine"
    output.mkdir()
    (output / "thesis.tex").write_text("years of work")
    line = refused("save: --replace of a folder that is not a checkpoint", SAVE, "--model", str(source),
                   "--output", str(output), "--replace", unchanged=output)
    assert "is not a checkpoint" in line


def test_saving_a_checkpoint_again_is_refused(files_only, tmp_path):
    # Seen: the re-save copied the old manifest and wrote a checkpoint that never loads.
    line = refused("save: --model is a pre-sharded checkpoint", SAVE, "--model", str(files_only(2, 1)),
                   "--output", str(tmp_path / "out"), unchanged=files_only(2, 1))
    assert "is a pre-sharded checkpoint" in line and "save from the model it was made from" in line
    nothing_left(tmp_path / "out")


@pytest.mark.parametrize("pattern", ["../x-{rank}-{part}.safetensors", "sub/x-{rank}-{part}.safetensors",
                                     ".x-{rank}-{part}.safetensors"])
def test_file_pattern_must_name_a_plain_file(source, tmp_path, pattern):
    # Seen: '../' wrote weights outside --output and published a checkpoint without them.
    line = refused(f"save: --file-pattern {pattern}", SAVE, "--model", str(source),
                   "--output", str(tmp_path / "out"), "--file-pattern", pattern)
    assert "must name a plain file" in line
    assert sorted(tmp_path.iterdir()) == []


def test_tensor_parallel_size_zero(source, tmp_path):
    line = refused("save: --tensor-parallel-size 0", SAVE, "--model", str(source), "--output", str(tmp_path / "out"),
                   "--tensor-parallel-size", "0")
    assert line == "error: --tensor-parallel-size 0: use 1 or more"


def test_max_file_size_zero(source, tmp_path):
    line = refused("save: --max-file-size 0", SAVE, "--model", str(source), "--output", str(tmp_path / "out"),
                   "--max-file-size", "0")
    assert "not a positive size" in line


def test_checks_run_before_torch_or_vllm_is_imported(source, tmp_path):
    probe = ("import os, runpy, sys\nexit = os._exit\n"
             "os._exit = lambda code: (print(code, 'torch' in sys.modules, 'vllm' in sys.modules, flush=True), "
             "exit(code))\n"
             f"sys.argv = ['save_sharded_state.py', '--model', {str(source)!r}, '--output', {str(source / 'x')!r}]\n"
             "runpy.run_path('save_sharded_state.py', run_name='__main__')")
    proc = subprocess.run([sys.executable, "-c", probe], cwd=ROOT, capture_output=True, text=True, timeout=60)
    assert proc.stdout.split() == ["1", "False", "False"], proc.stderr[-2000:]
    assert "is inside the source model" in proc.stderr


@pytest.mark.parametrize("case,flags,words", [
    ("online quantization", ["-q", "fp8"], "issue 41174"),
    ("pipeline stages", ["-pp", "2"], "overwrite each other"),
    ("several nodes", ["--nnodes", "2"], "no record of them"),
    ("a pattern with {tp_rank}", ["--file-pattern", "m-{tp_rank}-{part}.safetensors"], "only {rank} and {part}"),
])
def test_vllm_save_hook_where_it_does_not_load_back(source, tmp_path, case, flags, words):
    line = refused(f"save: --vllm-save-hook with {case}", SAVE, "--model", str(source), "--output",
                   str(tmp_path / "out"), "--vllm-save-hook", *flags)
    assert words in line
    nothing_left(tmp_path / "out")


def test_vllm_save_hook_on_a_mixture_of_experts(tmp_path):
    from presharded.tiny_models import build_tiny

    moe = build_tiny(tmp_path / "moe", "qwen3-moe", num_layers=1)
    line = refused("save: --vllm-save-hook on a mixture-of-experts model", SAVE, "--model", str(moe), "--output",
                   str(tmp_path / "out"), "--vllm-save-hook")
    assert "mixture-of-experts" in line and "PR 51496" in line
    nothing_left(tmp_path / "out")


def test_a_failure_inside_vllms_hook_is_one_line():
    """vLLM 0.26's hook fails on MLA's views (DeepSeek-V2, dev/results/architectures-2026-12-07-h100-d) with an
    exception of its own: one line that names it."""
    from types import SimpleNamespace

    from presharded.errors import UserError
    from presharded.save import Save

    failure = "Call to save_sharded_state method failed: view size is not compatible with input tensor's size"
    with pytest.raises(UserError) as refusal:
        with Save.hook_save(SimpleNamespace(seconds={})):
            raise Exception(failure)
    assert str(refusal.value) == f"vLLM's save hook failed: {failure}; drop --vllm-save-hook to save each rank as it loads"
