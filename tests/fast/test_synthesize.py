"""presharded-bench's synthetic models: a real architecture's shapes, with
fewer layers where the whole model would not fit the disk (issue 27's 70B)."""

import json

from safetensors import safe_open

from presharded.bench import synthesize


def test_a_synthetic_model_keeps_the_width_and_takes_fewer_layers(tmp_path):
    out = synthesize("llama-3.2-1b", tmp_path / "model", layers=1)
    config = json.loads((out / "config.json").read_text())
    assert config["num_hidden_layers"] == 1 and config["hidden_size"] == 2048
    shapes = {}
    for path in out.glob("*.safetensors"):
        with safe_open(path, "pt") as f:
            shapes |= {name: f.get_slice(name).get_shape() for name in f.keys()}
    assert "model.layers.0.mlp.down_proj.weight" in shapes and not any(".layers.1." in n for n in shapes)
    assert shapes["model.embed_tokens.weight"] == [128256, 2048]

