"""The architecture matrix on a GPU: for each tiny model of presharded/tiny_models.py,
save it with save_sharded_state.py, then start an engine in a process of its
own (presharded.generate's greedy_tokens) from the source (`auto`) and from the
checkpoint (`sharded_state`, `fast_sharded_state`), and compare greedy tokens.
Not one process for all: on vLLM 0.26 a second engine in a process can give
other tokens than the first, whatever its format
(dev/results/moe-fp8-2026-11-30-h200x2/).
A load that the load script would refuse (vLLM 0.26's sharded_state on
weights quantized while loading) is recorded as refused, not run. With
--hook, each is also saved through vLLM's own save hook (save_sharded_state.py
--vllm-save-hook) and loaded both ways: `hook_sharded_state`,
`hook_fast_sharded_state`, or `hook: refused: ...` with the save's one line.
With --hook-unchecked, the save goes through dev/hook_unchecked.py instead (vLLM's hook on a
mixture of experts, which the script refuses). With --auto-runs N, `auto` starts N times (`auto_again`: each later run against the
first), which tells a model whose tokens vary from one engine to the next.
With --snapshot, an engine snapshot of the checkpoint is made (presharded-snapshot,
with the same engine flags) and restored (the load with --snapshot): `snapshot` says
whether it was restored and whether its tokens for the first prompt are `auto`'s.

    PYTHONPATH=. python3 dev/gpu_matrix.py --out $OUT/bf16 [--archs qwen2,opt] [--hook] [--snapshot] [--auto-runs N] \
        [ENGINE FLAGS...]

Prints one JSON line per architecture and writes them to OUT/matrix.jsonl.
"""

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path

from presharded.load_checks import check_for_load
from presharded.errors import UserError
from presharded.tiny_models import ARCHITECTURES, VISION, build_tiny
from presharded.generate import greedy_tokens

ROOT = Path(__file__).resolve().parent.parent
PROMPTS = ["The quick brown fox", "A pre-sharded checkpoint is"]  # the results so far used these two


def prompts_for(arch: str, work: Path) -> list:
    """PROMPTS; for a vision-language model, an image made here asked about first."""
    if arch not in VISION:
        return PROMPTS
    import numpy as np
    from PIL import Image

    Image.fromarray(np.random.default_rng(0).integers(0, 256, (48, 64, 3), dtype=np.uint8)).save(work / "noise.png")
    return [{"prompt": f"<image>{PROMPTS[0]}", "image": str(work / "noise.png")}, *PROMPTS]


def one(arch: str, work: Path, flags: list[str], hook: str | None = None, snapshot: bool = False,
        auto_runs: int = 1) -> dict:
    source = build_tiny(work / arch, arch, num_layers=2)
    prompts = prompts_for(arch, work)
    checkpoint = work / f"{arch}-ckpt"
    save = subprocess.run([sys.executable, str(ROOT / "save_sharded_state.py"), "--model", str(source),
                           "--output", str(checkpoint), "--replace", "--no-start-caches", *flags],
                          capture_output=True, text=True)
    if save.returncode != 0:  # the worker's own error and where it was raised, before the engine's wrap-up
        (work / f"{arch}-save.err").write_text(save.stderr)
        lines = save.stderr.strip().splitlines()
        causes = [i for i, line in enumerate(lines) if "Error" in line and "Engine core initialization" not in line]
        return {"arch": arch, "save": "failed", "error": lines[max(0, causes[0] - 12):causes[0] + 6] if causes else lines[-1:]}
    result = {"arch": arch, "auto": greedy_tokens([(source, "auto")], flags, prompts)[0]["token_ids"]}
    if auto_runs > 1:  # does `auto` itself give other tokens from one engine to the next?
        again = [greedy_tokens([(source, "auto")], flags, prompts)[0]["token_ids"] for _ in range(auto_runs - 1)]
        result["auto_again"] = ["identical" if t == result["auto"] else {"differs": t} for t in again]
    for load_format in ("sharded_state", "fast_sharded_state"):
        try:
            check_for_load(checkpoint, load_format=load_format)
        except UserError as e:
            result[load_format] = f"refused: {e}"
            continue
        tokens = greedy_tokens([(checkpoint, load_format)], flags, prompts)[0]["token_ids"]
        result[load_format] = "identical" if tokens == result["auto"] else {"differs": tokens}
    if hook:
        result.update(through_the_hook(arch, source, work, flags, result["auto"], prompts, hook))
    if snapshot:
        result["snapshot"] = restored(checkpoint, flags, result["auto"][prompts.index(PROMPTS[0])])
    return result


def restored(checkpoint: Path, flags: list[str], auto: list[int]) -> dict | str:
    """The checkpoint's engine snapshot made with `flags`, then restored and asked the first prompt."""
    made = subprocess.run([sys.executable, "-m", "presharded.snapshot_cli", str(checkpoint), "--json", *flags],
                          capture_output=True, text=True)
    if made.returncode != 0:  # vLLM's own message is above the last line
        checkpoint.with_name(f"{checkpoint.name}-snapshot.err").write_text(made.stderr)
        return f"not made: {(made.stderr.strip().splitlines() or ['no message'])[-1]}"
    run = greedy_tokens([(checkpoint, "fast_sharded_state")], [*flags, "--snapshot", "--trust-snapshot"],
                        PROMPTS[:1])[0]
    return {"restored": run["snapshot"]["used"], "reason": run["snapshot"].get("reason"),
            "tokens": "identical" if run["token_ids"][0] == auto else {"differs": run["token_ids"][0]},
            "made": json.loads(made.stdout), "seconds": run["snapshot"].get("seconds")}


def through_the_hook(arch: str, source: Path, work: Path, flags: list[str], auto: list, prompts: list,
                     script: str = "save_sharded_state.py") -> dict:
    """The same source saved through vLLM's own save hook, loaded back both ways."""
    checkpoint = work / f"{arch}-hook"
    save = subprocess.run([sys.executable, str(ROOT / script), "--model", str(source),
                           "--output", str(checkpoint), "--replace", "--no-start-caches", "--vllm-save-hook", *flags],
                          capture_output=True, text=True)
    if save.returncode != 0:
        (work / f"{arch}-hook-save.err").write_text(save.stderr)
        return {"hook": f"refused: {(save.stderr.strip().splitlines() or ['no message'])[-1]}"}
    result = {}
    for load_format in ("sharded_state", "fast_sharded_state"):
        try:
            tokens = greedy_tokens([(checkpoint, load_format)], flags, prompts)[0]["token_ids"]
            result[f"hook_{load_format}"] = "identical" if tokens == auto else {"differs": tokens}
        except UserError as e:
            result[f"hook_{load_format}"] = f"failed: {e}"
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--archs", default=",".join(ARCHITECTURES))
    parser.add_argument("--work", type=Path, default=Path("/tmp/presharded-matrix"))
    parser.add_argument("--hook", action="store_true", help="also save through vLLM's own save hook")
    parser.add_argument("--hook-unchecked", action="store_true", help="--hook, a mixture of experts not refused")
    parser.add_argument("--snapshot", action="store_true", help="also make and restore an engine snapshot")
    parser.add_argument("--auto-runs", type=int, default=1, help="start `auto` this many times, each compared")
    args, flags = parser.parse_known_args()
    args.out.mkdir(parents=True, exist_ok=True)
    for arch in args.archs.split(","):
        start = time.perf_counter()
        try:
            hook = "dev/hook_unchecked.py" if args.hook_unchecked else "save_sharded_state.py" if args.hook else None
            result = one(arch, args.work, flags, hook, args.snapshot, args.auto_runs)
        except Exception as e:  # one architecture's failure must not hide the others
            result = {"arch": arch, "error": f"{type(e).__name__}: {e}"[:2000]}
        result["seconds"] = round(time.perf_counter() - start, 1)
        line = json.dumps(result)
        print(line, flush=True)
        with open(args.out / "matrix.jsonl", "a") as f:
            f.write(line + "\n")


if __name__ == "__main__":
    main()
