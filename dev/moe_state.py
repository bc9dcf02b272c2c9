"""Where vLLM's own load (`auto` on the source) and ours (`fast_sharded_state`
on the checkpoint) part ways, on a tiny Qwen3-MoE (or another) with `--quantization fp8`
(dev/results/moe-fp8-2026-11-30-h200x2/): `save` makes the source and the
checkpoint; then for each run the model's whole state after loading, each
state tensor's layout, and every module's output at each step of two
prompts' greedy tokens, in the order the modules ran. One engine per
process, in-process (one engine does not give its GPU memory back);
`compare` prints the tokens, the state tensors that differ and the first
module output that differs.

    export VLLM_ENABLE_V1_MULTIPROCESSING=0 VLLM_ALLOW_INSECURE_SERIALIZATION=1 PYTHONPATH=.
    for step in save auto fast compare; do python3 dev/moe_state.py $OUT $step; done

Another tiny architecture, and engine flags for the save and both loads, after the step:
`python3 dev/moe_state.py $OUT $step granite-hybrid --gpu-memory-utilization 0.08`.
"""

import sys
from pathlib import Path

import torch

ARCH = sys.argv[3] if len(sys.argv) > 3 else "qwen3-moe"
FLAGS = ["--quantization", "fp8", "--enforce-eager", *sys.argv[4:]]
WORK = Path("/tmp/presharded-moe") / ARCH
RUNS = {"auto": (WORK / "source", "auto"), "fast": (WORK / "checkpoint", "fast_sharded_state")}
PROMPTS = ["The quick brown fox", "A pre-sharded checkpoint is"]  # gpu_matrix's, in one batch
STEPS = 16  # gpu_matrix's tokens per prompt
OUTPUTS: list[tuple[str, torch.Tensor]] = []  # filled by the hooks, in this process (in-process engine)


def save() -> None:
    import runpy

    from presharded.tiny_models import build_tiny

    build_tiny(RUNS["auto"][0], ARCH, num_layers=2)
    sys.argv = ["save_sharded_state.py", "--model", str(RUNS["auto"][0]), "--output", str(RUNS["fast"][0]),
                "--replace", "--no-start-caches", *FLAGS]
    runpy.run_path(str(Path(__file__).resolve().parent.parent / "save_sharded_state.py"), run_name="__main__")


def record(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    def hook(name):
        def save(module, args, output):
            first = output[0] if isinstance(output, (tuple, list)) else output
            if isinstance(first, torch.Tensor):
                OUTPUTS.append((name, first.detach().float().cpu().clone()))
        return save

    for name, module in model.named_modules():
        module.register_forward_hook(hook(name))
    state = model.state_dict()
    return {"state": {k: v.detach().cpu().clone() for k, v in state.items()},
            "strides": {k: (tuple(v.stride()), v.storage_offset()) for k, v in state.items()}}


def capture(out: Path, name: str) -> None:
    from vllm import LLM, EngineArgs, SamplingParams

    from presharded.engine_defaults import apply_engine_defaults
    from presharded.flags import parse_engine_flags
    from presharded.generate import add_flags

    model, load_format = RUNS[name]
    args, parser = parse_engine_flags(["--model", str(model), "--load-format", load_format, "--prompts", "[]",
                                       *FLAGS], add_flags, "")
    apply_engine_defaults(args, parser, saving=False)
    llm = LLM.from_engine_args(EngineArgs.from_cli_args(args))
    recorded = llm.apply_model(record)[0]
    tokens = llm.generate(PROMPTS, SamplingParams(temperature=0.0, max_tokens=STEPS), use_tqdm=False)
    torch.save({**recorded, "outputs": OUTPUTS, "tokens": [list(t.outputs[0].token_ids) for t in tokens]}, out / f"{name}.pt")
    print(name, len(recorded["state"]), "tensors,", len(OUTPUTS), "module outputs", flush=True)


def compare(out: Path) -> None:
    a, b = torch.load(out / "auto.pt"), torch.load(out / "fast.pt")

    def same(x: torch.Tensor, y: torch.Tensor) -> bool:
        raw = (lambda t: t.view(torch.uint8) if t.element_size() == 1 else t)
        return x.shape == y.shape and x.dtype == y.dtype and torch.equal(raw(x), raw(y))

    print("tokens:", a["tokens"], b["tokens"], sep="\n")
    differ = [k for k in a["state"] if k not in b["state"] or not same(a["state"][k], b["state"][k])]
    print(f"state: {len(differ)} of {len(a['state'])} tensors differ", differ[:5])
    layout = [(k, a["strides"][k], b["strides"].get(k)) for k in a["strides"] if a["strides"][k] != b["strides"].get(k)]
    print(f"layout (strides, offset): {len(layout)} tensors differ", layout[:8])
    per_step = len(a["outputs"]) // STEPS if len(a["outputs"]) % STEPS == 0 else 0
    for i, ((name, x), (name_b, y)) in enumerate(zip(a["outputs"], b["outputs"])):
        if name != name_b or not same(x, y):
            gap = (x - y).abs().max().item() if x.shape == y.shape else "shapes differ"
            step = i // per_step if per_step else "?"
            print(f"first module output that differs: step {step}, {name} (fast: {name_b}), max |difference| {gap}")
            return
    print(f"all {len(a['outputs'])} module outputs identical")


if __name__ == "__main__":
    target, what = Path(sys.argv[1]), sys.argv[2]
    {"save": lambda: save(), "compare": lambda: compare(target)}.get(what, lambda: capture(target, what))()
