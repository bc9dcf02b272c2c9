"""Save with save_sharded_state.py, load with load_sharded_state.py (vLLM's
built-in sharded_state loader), and get the same greedy tokens as the source
model loaded with load_format=auto."""

from safetensors import safe_open

from conftest import generate, save
from presharded.formats import SHARDED_STATE
from presharded.manifest import read_manifest


# TP=2 here, sizes given (in the process of the TP=2 reference, conftest.py); sizes from the manifest:
# across two nodes (tests/test_nodes.py). PP=2: DeepSeek-V2, saved across two nodes (there too). TP=1: the
# checkpoint in parts below, through the load script.
def test_round_trip_tp2(tp2_loads):
    loads = tp2_loads()
    out = loads[SHARDED_STATE]
    assert (out["load_format"], out["tensor_parallel_size"], out["pipeline_parallel_size"]) == (SHARDED_STATE, 2, 1)
    assert len(out["token_ids"][0]) == 24
    assert out["token_ids"] == loads["auto"]["token_ids"]


def test_file_names_are_vllms(checkpoints):
    assert sorted(p.name for p in checkpoints(2, 1).glob("*.safetensors")) == [
        "model-rank-0-part-0.safetensors", "model-rank-1-part-0.safetensors"]


def test_saved_checkpoint_has_config_and_tokenizer_but_no_source_weights(checkpoints):
    names = {p.name for p in checkpoints(1, 1).iterdir()}
    assert {"config.json", "tokenizer.json", "tokenizer_config.json", "generation_config.json",
            "chat_template.jinja"} <= names
    assert "model.safetensors" not in names


def test_ranks_hold_their_own_slices(checkpoints, tiny_model):
    """Each TP rank holds half of a column-parallel weight, not all of it."""
    keys = {}
    for rank in (0, 1):
        with safe_open(checkpoints(2, 1) / f"model-rank-{rank}-part-0.safetensors", "pt") as f:
            keys[rank] = {k: f.get_slice(k).get_shape() for k in f.keys()}
    assert keys[0].keys() == keys[1].keys()
    qkv = next(k for k in keys[0] if k.endswith("qkv_proj.weight"))
    # hidden 128 = 4 heads x 32; 2 KV heads: q+k+v rows = 128 + 64 + 64, halved per rank
    assert keys[0][qkv] == [128, 128]
    assert "model.layers.0.mlp.down_proj.weight" in keys[0]  # linear weights are all there


def test_small_max_file_size_splits_into_parts(tiny_model, reference_tokens, tmp_path):
    output = tmp_path / "parts"
    output.mkdir()
    (output / "model-rank-1-part-0.safetensors").write_bytes(b"stale part of an earlier save")
    save(tiny_model, output, "--max-file-size", "200KB", "--replace")
    parts = sorted(p.name for p in output.glob("*.safetensors"))
    assert len(parts) > 3 and all(p.startswith("model-rank-0-part-") for p in parts)
    out = generate(output, "--prefetch")  # the parts read ahead, too
    assert (out["load_format"], out["tensor_parallel_size"]) == (SHARDED_STATE, 1)
    assert out["token_ids"] == reference_tokens(1, 1)
    assert set(out["seconds"]) >= {"import", "engine", "generate"}


def test_manifest_records_the_checkpoint(checkpoints, tiny_model):
    from presharded.manifest import hash_file

    checkpoint = checkpoints(2, 1)
    m = read_manifest(checkpoint)
    assert (m.format, m.format_version, m.hash) == ("presharded", 3, "blake3")
    assert (m.tensor_parallel_size, m.pipeline_parallel_size) == (2, 1)
    assert m.file_pattern == "model-rank-{rank}-part-{part}.safetensors"
    assert m.architecture == "LlamaForCausalLM"
    assert m.dtype in ("bfloat16", "float32") and m.quantization is None
    assert m.vllm_version.startswith("0.")
    assert m.source == str(tiny_model)
    assert [(s.tp_rank, s.pp_rank, s.part) for s in m.shards] == [(0, 0, 0), (1, 0, 0)]
    listed = {e.path for e in [*m.shards, *m.files]} | {"presharded.json"}
    assert {p.name for p in checkpoint.iterdir()} == listed
    for entry in [*m.shards, *m.files]:
        assert (checkpoint / entry.path).stat().st_size == entry.size
        assert hash_file(checkpoint / entry.path) == entry.blake3
    assert m.total_bytes == sum(s.size for s in m.shards)
