"""Which experts each rank of a checkpoint saved with --enable-expert-parallel holds: for every layer, rank r's
fused experts (w13 = gate and up, w2 = down) against the source's experts n*r .. n*r+n-1, in the checkpoint's dtype.

    python dev/expert_split.py SOURCE CHECKPOINT   # Qwen3-MoE's names (model.layers.L.mlp.experts.E.gate_proj...)
"""

import sys
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import load_file


def main() -> None:
    source, checkpoint = Path(sys.argv[1]), Path(sys.argv[2])
    weights = {}
    for f in source.glob("*.safetensors"):
        weights.update(load_file(f))
    ranks = sorted(checkpoint.glob("model-rank-*-part-0.safetensors"))
    checked = wrong = 0
    for rank, path in enumerate(ranks):
        with safe_open(path, "pt") as f:
            for name in (k for k in f.keys() if k.endswith("w13_weight")):
                layer = name.split(".mlp.")[0]
                w13, w2 = f.get_tensor(name), f.get_tensor(name.replace("w13_weight", "w2_weight"))
                for j in range(w13.shape[0]):
                    e = f"{layer}.mlp.experts.{rank * w13.shape[0] + j}."
                    gate_up = torch.cat([weights[e + "gate_proj.weight"], weights[e + "up_proj.weight"]]).to(w13.dtype)
                    down = weights[e + "down_proj.weight"].to(w2.dtype)
                    wrong += not (torch.equal(w13[j], gate_up) and torch.equal(w2[j], down))
                    checked += 1
        print(f"{path.name}: {w13.shape[0]} experts a layer, w13 {tuple(w13.shape)}, w2 {tuple(w2.shape)}")
    print(f"{checked} experts checked over {len(ranks)} ranks, {wrong} not as the source's")
    sys.exit(1 if wrong or not checked else 0)


if __name__ == "__main__":
    main()
