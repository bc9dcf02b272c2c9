"""What is copied beside the weights: everything the model needs, never the
source's own weights."""

from presharded.source_model import copy_model_files

KEEP = ["config.json", "generation_config.json", "tokenizer.json", "tokenizer_config.json",
        "special_tokens_map.json", "tokenizer.model", "chat_template.jinja",
        "modeling_custom.py", "preprocessor_config.json", "README.md"]
DROP = ["model-00001-of-00002.safetensors", "model-00002-of-00002.safetensors",
        "model.safetensors.index.json", "pytorch_model.bin", "pytorch_model.bin.index.json",
        "consolidated.pth", "training_args.pt", "original/consolidated.00.pth",
        "original/params.json", "original/tokenizer.model", ".gitattributes", ".cache/huggingface/x.lock",
        "presharded.json", ".presharded-unfinished", ".rank-pp0-tp0.json"]


def test_copy_filter(tmp_path):
    source, dest = tmp_path / "source", tmp_path / "dest"
    for name in KEEP + DROP:
        (source / name).parent.mkdir(parents=True, exist_ok=True)
        (source / name).write_text(name)
    dest.mkdir()
    copied = copy_model_files(source, dest)
    assert sorted(copied) == sorted(KEEP)
    assert sorted(p.relative_to(dest).as_posix() for p in dest.rglob("*") if p.is_file()) == sorted(KEEP)
    assert (dest / "config.json").read_text() == "config.json"
    assert sorted(p.relative_to(source).as_posix() for p in source.rglob("*") if p.is_file()) == sorted(KEEP + DROP)
