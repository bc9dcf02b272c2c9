"""A checkpoint that does not fit the request, or is damaged, is refused before
vLLM is imported: exit 1, one line naming the problem and the fix, under 5 s.
The checkpoints are written without vLLM: only their files are read."""

import json
import shutil

import pytest

from conftest import refused, run_script
from presharded.staging import UNFINISHED_MARKER

LOAD = "load_sharded_state.py"


@pytest.fixture
def tp2_copy(files_only, tmp_path):
    return shutil.copytree(files_only(2, 1), tmp_path / "tp2")


def test_tp2_checkpoint_at_tp1(files_only):
    line = refused("TP=2 checkpoint loaded at TP=1", LOAD, "--model", str(files_only(2, 1)),
                   "--tensor-parallel-size", "1", unchanged=files_only(2, 1))
    assert "saved for tensor-parallel size 2 but 1 was asked" in line
    assert "--tensor-parallel-size 2" in line


def test_tp1_checkpoint_at_tp2(files_only):
    line = refused("TP=1 checkpoint loaded at TP=2", LOAD, "--model", str(files_only(1, 1)), "-tp", "2",
                   unchanged=files_only(1, 1))
    assert "saved for tensor-parallel size 1 but 2 was asked" in line


def test_pp_mismatch(files_only):
    line = refused("PP=2 checkpoint loaded at PP=1", LOAD, "--model", str(files_only(1, 2)),
                   "--pipeline_parallel_size", "1", unchanged=files_only(1, 2))
    assert "saved for pipeline-parallel size 2 but 1 was asked" in line


def test_missing_rank_file(tp2_copy):
    (tp2_copy / "model-rank-1-part-0.safetensors").unlink()
    line = refused("a rank's file missing", LOAD, "--model", str(tp2_copy), unchanged=tp2_copy)
    assert "model-rank-1-part-0.safetensors is missing" in line


def test_truncated_file(tp2_copy):
    path = tp2_copy / "model-rank-0-part-0.safetensors"
    path.write_bytes(path.read_bytes()[:-100])
    line = refused("a truncated file", LOAD, "--model", str(tp2_copy), unchanged=tp2_copy)
    assert "model-rank-0-part-0.safetensors has" in line and "the manifest says" in line


def test_flipped_byte_with_verify_hashes(tp2_copy):
    path = tp2_copy / "model-rank-1-part-0.safetensors"
    data = bytearray(path.read_bytes())
    data[-1] ^= 0x01  # a byte of the weights
    path.write_bytes(bytes(data))
    line = refused("a flipped byte (--verify-hashes)", LOAD, "--model", str(tp2_copy), "--verify-hashes",
                   unchanged=tp2_copy)
    assert "model-rank-1-part-0.safetensors does not match its hash" in line


def test_stray_part_file(tp2_copy):
    shutil.copy(tp2_copy / "model-rank-1-part-0.safetensors", tp2_copy / "model-rank-1-part-1.safetensors")
    line = refused("a stray part file", LOAD, "--model", str(tp2_copy), unchanged=tp2_copy)
    assert "model-rank-1-part-1.safetensors is not part of this checkpoint" in line


def test_malformed_manifest(tp2_copy):
    (tp2_copy / "presharded.json").write_text('{"format": "presharded", "format_version": 1')
    line = refused("a malformed manifest", LOAD, "--model", str(tp2_copy), unchanged=tp2_copy)
    assert "presharded.json is not valid JSON" in line


def test_manifest_missing_fields(tp2_copy):
    (tp2_copy / "presharded.json").write_text('{"format": "presharded", "format_version": 1}')
    line = refused("a manifest lacking fields", LOAD, "--model", str(tp2_copy), unchanged=tp2_copy)
    assert "presharded.json lacks the field 'vllm_version' in the manifest" in line


def test_unreadable_manifest(tp2_copy):
    (tp2_copy / "presharded.json").write_bytes(b"\xff\xfe\x00garbage")
    line = refused("an unreadable manifest", LOAD, "--model", str(tp2_copy), unchanged=tp2_copy)
    assert "cannot read" in line and "presharded.json" in line


def test_newer_manifest_version(tp2_copy):
    manifest = json.loads((tp2_copy / "presharded.json").read_text())
    manifest["format_version"] = 99
    (tp2_copy / "presharded.json").write_text(json.dumps(manifest))
    line = refused("a manifest of a newer format", LOAD, "--model", str(tp2_copy), unchanged=tp2_copy)
    assert "format version 99" in line and "upgrade presharded" in line


def test_missing_checkpoint(tmp_path):
    line = refused("a checkpoint path that does not exist", LOAD, "--model", str(tmp_path / "nope"))
    assert "is not a folder" in line


def test_unfinished_save(tp2_copy):
    (tp2_copy / UNFINISHED_MARKER).touch()
    line = refused("an unfinished save (staging folder)", LOAD, "--model", str(tp2_copy), unchanged=tp2_copy)
    assert "is an unfinished save" in line


def test_online_quantized_with_sharded_state(tp2_copy):
    # What --quantization fp8 over bf16 weights saves (a GPU-only path; see docs/gpu.md):
    # vLLM's sharded_state would copy into weights that are still on the meta device.
    manifest = json.loads((tp2_copy / "presharded.json").read_text())
    manifest.update(quantization="fp8", online_quantization=True)
    (tp2_copy / "presharded.json").write_text(json.dumps(manifest))
    line = refused("online-quantized weights with sharded_state", LOAD, "--model", str(tp2_copy), unchanged=tp2_copy)
    assert "quantizes (fp8) while loading" in line and "--load-format fast_sharded_state" in line
    summary = run_script("presharded.inspect_cli", str(tp2_copy)).stdout
    assert "quantization fp8 (applied while loading: load with fast_sharded_state)" in summary


def test_edited_config(tp2_copy):
    # Seen: hidden_size 128 -> 256 (same file length) loaded with exit 0 and every token 0.
    config = tp2_copy / "config.json"
    text = config.read_text()
    assert '"hidden_size": 128' in text
    config.write_text(text.replace('"hidden_size": 128', '"hidden_size": 256'))
    line = refused("an edited config.json", LOAD, "--model", str(tp2_copy), unchanged=tp2_copy)
    assert "config.json does not match its hash" in line


def rewrite_header(path, edit) -> None:
    """Edit a safetensors file's tensor table, keeping its length."""
    data = path.read_bytes()
    length = int.from_bytes(data[:8], "little")
    header = edit(data[8 : 8 + length].decode())
    assert len(header) == length
    path.write_bytes(data[:8] + header.encode() + data[8 + length :])


@pytest.mark.parametrize("edit", [
    lambda h: h.replace('"weight"', '"weighs"'),
    lambda h: h.replace('"shape":[4]', '"shape":[2]', 1),
], ids=["renamed", "reshaped"])
def test_damaged_tensor_table(tp2_copy, edit):
    path = tp2_copy / "model-rank-0-part-0.safetensors"
    rewrite_header(path, edit)
    line = refused("a damaged tensor table (a tensor renamed or reshaped)", LOAD, "--model", str(tp2_copy),
                   unchanged=tp2_copy)
    assert "model-rank-0-part-0.safetensors: its tensor table" in line


def test_glob_characters_in_the_path(files_only, tmp_path):
    # vLLM's sharded_state finds the files with glob: '[1]' matched nothing and the engine died.
    odd = shutil.copytree(files_only(1, 1), tmp_path / "ckpt[1]")
    line = refused("a checkpoint path with [ ] (sharded_state)", LOAD, "--model", str(odd), unchanged=odd)
    assert "glob character" in line and "fast_sharded_state" in line


@pytest.mark.parametrize("flags", [["--max-tokens", "0"], ["--max-tokens", "-3"], ["--temperature", "-1"],
                                   ["--temperature", "nan"], ["--temperature", "inf"], ["--top-p", "0"],
                                   ["--top-p", "nan"]],
                         ids=["max-tokens-0", "max-tokens-negative", "temperature-negative", "temperature-nan",
                              "temperature-inf", "top-p-0", "top-p-nan"])
def test_sampling_flags(files_only, flags):
    line = refused(f"sampling flags {' '.join(flags)}", LOAD, "--model", str(files_only(1, 1)), *flags)
    assert line.startswith(f"error: {flags[0]} ")


def test_a_prompt_that_is_not_utf8(files_only):
    line = refused("a prompt that is not UTF-8", LOAD, "--model", str(files_only(1, 1)), "--prompt", b"ab\xffc")
    assert line == "error: --prompt is not UTF-8 text (byte 0xff at character 2); pass UTF-8 text"


def test_an_image_that_is_not_one(files_only, tmp_path):
    # Read before vLLM is imported: a vision-language model's --image that is text, or not there.
    (tmp_path / "photo.png").write_text("not an image")
    line = refused("--image that is not an image", LOAD, "--model", str(files_only(1, 1)), "--image",
                   str(tmp_path / "photo.png"))
    assert line == f"error: cannot read --image {tmp_path / 'photo.png'} (cannot identify image file " \
                   f"'{tmp_path / 'photo.png'}'); pass an image file (PNG, JPEG, ...)"
    line = refused("--image that is not there", LOAD, "--model", str(files_only(1, 1)), "--image",
                   str(tmp_path / "none.png"))
    assert "(No such file or directory)" in line


@pytest.mark.parametrize("flags, expected", [
    (["-tp", "0"], "--tensor-parallel-size 0: use 1 or more"),
    (["--pipeline-parallel-size", "-1"], "--pipeline-parallel-size -1: use 1 or more"),
    (["--nnodes", "0"], "--nnodes 0: use 1 or more"),
    (["--nnodes", "2", "--node-rank", "2"], "--node-rank 2: with --nnodes 2, use 0 to 1"),
    (["--master-port", "70000"], "--master-port 70000: use a port from 1 to 65535"),
], ids=["tp-0", "pp-negative", "nnodes-0", "node-rank-outside", "port-outside"])
def test_sizes_out_of_range(files_only, flags, expected):
    line = refused(f"sizes out of range: {' '.join(flags)}", LOAD, "--model", str(files_only(1, 1)), *flags)
    assert line == f"error: {expected}"


def test_layout_from_a_config_file(files_only, tmp_path):
    config = tmp_path / "engine.yaml"
    config.write_text("tensor-parallel-size: 1\nenforce_eager: true\n")
    line = refused("TP=1 from a --config file, for a TP=2 checkpoint", LOAD, "--model", str(files_only(2, 1)),
                   "--config", str(config))
    assert "saved for tensor-parallel size 2 but 1 was asked" in line


def test_manifest_less_checkpoint_at_another_tp(tp2_copy):
    # Seen: vLLM's own layout, no manifest, loaded at TP=1 with exit 0 and garbage.
    (tp2_copy / "presharded.json").unlink()
    line = refused("a TP=2 checkpoint without a manifest, at TP=1", LOAD, "--model", str(tp2_copy), "-tp", "1",
                   unchanged=tp2_copy)
    assert "saved for tensor-parallel size 2 but 1 was asked" in line


def test_inspect_a_path_that_is_not_a_folder(tp2_copy, tmp_path):
    line = refused("inspect: a path that does not exist", "presharded.inspect_cli", str(tmp_path / "nope"))
    assert "does not exist" in line
    line = refused("inspect: a file", "presharded.inspect_cli", str(tp2_copy / "config.json"))
    assert "is a file" in line
