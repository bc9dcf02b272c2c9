"""Benchmark the whole start-up, per load format, cold and warm.

For a model (or a synthetic model in a real architecture's shapes, made
here) and, at each TP size, the checkpoint saved from it in --work (the
bench says how to save one where there is none): start vLLM with each load
format in a fresh process, with the page cache dropped (cold) or filled (warm), a few times.
Reports per rank the weights' seconds and GB/s, and the start-up split into
import, engine start, model init, weights, profiling + KV cache + warm-up,
and first token; plus `dummy` (no weights read: vLLM's own floor) and what
`dd` reads cold from the same files. Prints a table, writes JSON and a PNG.

    presharded-bench --synthetic llama-3-8b --tp 1,2 --out results/

Each start runs `python -m presharded.generate`, the package's own engine start.

`--fresh` measures a new node instead: every start with empty compile caches
and a cold page cache (the weights and the Python packages), for vLLM's
`sharded_state`, ours without and with the checkpoint's start-up caches (and
with the weights read ahead), the checkpoint's engine snapshot restored
(`snapshot`: made first with presharded-snapshot; right before each, the
time `cat` takes to read the image and the weights cold), each followed by
the same node warm, --repeats times. A new node's page cache is written back (`sync`) and dropped, then
checked: a start is not timed while any page of the weights or the image is
still cached. Every start is also timed whole, from outside its process
(`process`), beside the script's own phases; the ratios use those.
"""

import argparse
import json
import os
import re
import shlex
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import shutil

import torch
from safetensors.torch import save_file

from presharded.env import LOAD_REPORT_ENV
from presharded.errors import UserError, exits_cleanly
from presharded.formats import FAST_FORMAT, SHARDED_STATE
from presharded.manifest import read_manifest
from presharded.snapshot_sets import IMAGES
from presharded.workspace import WORKSPACE
from presharded.start_caches import KINDS
from presharded.tiny_models import build_tiny_llama, build_tokenizer
from presharded.trust import TRUST_FLAG, TRUST_SNAPSHOT_FLAG

ARCHITECTURES = {  # LlamaConfig arguments of real models' shapes
    "llama-3-70b": dict(hidden_size=8192, intermediate_size=28672, num_hidden_layers=80, num_attention_heads=64,
                        num_key_value_heads=8, vocab_size=128256, max_position_embeddings=8192, rope_theta=500000.0),
    "llama-3-8b": dict(hidden_size=4096, intermediate_size=14336, num_hidden_layers=32, num_attention_heads=32,
                       num_key_value_heads=8, vocab_size=128256, max_position_embeddings=8192, rope_theta=500000.0),
    "llama-3.2-1b": dict(hidden_size=2048, intermediate_size=8192, num_hidden_layers=16, num_attention_heads=32,
                         num_key_value_heads=8, vocab_size=128256, max_position_embeddings=8192,
                         rope_theta=500000.0, tie_word_embeddings=True),
}
LOG = {
    "weights": r"Loading weights took ([\d.]+) seconds",
    "model_loading": r"Model loading took [\d.]+ GiB(?: memory)? and ([\d.]+) seconds",
    "model_init": r"Initializing model took ([\d.]+) seconds",  # vLLM 0.32 on CPU logs no "Model loading took"
    "init_engine": r"init engine \(profile, create kv cache, warmup model\) took ([\d.]+) s",
}


def synthesize(name: str, out: Path, layers: int | None = None) -> Path:
    """Random bf16 weights in `name`'s shapes (they load exactly like trained ones),
    with `layers` of its layers where a whole model would not fit the disk."""
    if name == "tiny":
        return build_tiny_llama(out)
    from transformers import LlamaConfig, LlamaForCausalLM

    sizes = dict(ARCHITECTURES[name], **({"num_hidden_layers": layers} if layers else {}))
    config = LlamaConfig(**sizes, torch_dtype="bfloat16", bos_token_id=1, eos_token_id=2)
    with torch.device("meta"):
        shapes = {k: v.shape for k, v in LlamaForCausalLM(config).state_dict().items()}
    if config.tie_word_embeddings:
        shapes.pop("lm_head.weight", None)
    device = "cuda" if torch.cuda.is_available() else "cpu"
    out.mkdir(parents=True, exist_ok=True)
    part, size, index = {}, 0, 0
    for key, shape in shapes.items():
        part[key] = (torch.randn(shape, device=device, dtype=torch.bfloat16) * 0.02).cpu()
        size += part[key].nbytes
        if size > 4 * 10**9 or key == list(shapes)[-1]:
            save_file(part, out / f"model-{index:05d}.safetensors", metadata={"format": "pt"})
            part, size, index = {}, 0, index + 1
    config.save_pretrained(out)
    build_tokenizer().save_pretrained(out)
    return out


def set_cache(files: list[Path], warm: bool) -> None:
    """Fill the page cache with `files`, or drop them from it."""
    if warm:
        for f in files:
            with open(f, "rb") as fh:
                while fh.read(64 * 2**20):
                    pass
        return
    for f in files:
        fd = os.open(f, os.O_RDONLY)
        os.fsync(fd)
        os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
        os.close(fd)
    try:
        Path("/proc/sys/vm/drop_caches").write_text("1")
    except OSError:
        pass  # not allowed here: fadvise alone has dropped the files' clean pages


def resident_pages(files: list[Path]) -> tuple[int, int]:
    """(pages of `files` in the page cache, pages in all), as fincore and vmtouch count them (mincore)."""
    import ctypes
    import mmap

    libc = ctypes.CDLL(None, use_errno=True)
    libc.mmap.restype = ctypes.c_void_p
    libc.mmap.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int, ctypes.c_int, ctypes.c_int, ctypes.c_long]
    libc.mincore.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_void_p]
    libc.munmap.argtypes = [ctypes.c_void_p, ctypes.c_size_t]
    page = os.sysconf("SC_PAGE_SIZE")
    resident = total = 0
    for path in files:
        if not (size := path.stat().st_size):
            continue
        fd = os.open(path, os.O_RDONLY)
        try:
            address = libc.mmap(None, size, mmap.PROT_READ, mmap.MAP_SHARED, fd, 0)
            if address in (None, ctypes.c_void_p(-1).value):
                raise OSError(ctypes.get_errno(), f"cannot map {path}")
            pages = (size + page - 1) // page
            vector = (ctypes.c_ubyte * pages)()
            try:
                if libc.mincore(ctypes.c_void_p(address), size, vector) != 0:
                    raise OSError(ctypes.get_errno(), f"mincore failed on {path}")
            finally:
                libc.munmap(ctypes.c_void_p(address), size)
            resident += pages - bytes(vector).count(0)
            total += pages
        finally:
            os.close(fd)
    return resident, total


def dd(*args: str) -> float:
    """GB/s as dd reports it."""
    return dd_at_once([args])[0]


def dd_at_once(commands: list[tuple[str, ...]]) -> list[float]:
    """GB/s of each dd, all started together."""
    procs = [subprocess.Popen(["dd", *args], stderr=subprocess.PIPE, text=True) for args in commands]
    found = [re.search(r"(\d+) bytes.*?copied, ([\d.]+) s", proc.communicate()[1]).groups() for proc in procs]
    return [int(nbytes) / float(seconds) / 1e9 for nbytes, seconds in found]


def dd_gbps(path: Path) -> float:
    """How fast the disk reads `path` cold."""
    set_cache([path], warm=False)
    return dd(f"if={path}", "of=/dev/null", "bs=64M")


def parse_format(spec: str) -> tuple[str, dict]:
    """`fast_sharded_state:chunk_mib=64:threads=8` -> the load format and its loader options."""
    name, *options = spec.split(":")
    config = {}
    for option in options:
        key, _, value = option.partition("=")
        config[key] = int(value) if value.isdigit() else value
    return name, config


def timed_start(model: Path, spec: str, tp: int, extra: list[str], env: dict | None = None, tokens: int = 1) -> dict:
    load_format, config = parse_format(spec)
    options = ["--model-loader-extra-config", json.dumps(config)] if config else []
    cmd = [sys.executable, "-m", "presharded.generate", json.dumps([[str(model), load_format]]), "--prompts",
           json.dumps(["The quick brown fox"]), "-tp", str(tp), "--max-tokens", str(tokens), *options, *extra]
    with tempfile.NamedTemporaryFile("r", suffix=".jsonl") as report:  # our loader's timings, one line per rank
        env = dict(os.environ, VLLM_LOGGING_LEVEL="INFO", **{LOAD_REPORT_ENV: report.name}, **(env or {}))
        started = time.perf_counter()
        proc = subprocess.run(cmd, capture_output=True, text=True, env=env)
        process = round(time.perf_counter() - started, 3)  # from exec to exit, timed from outside
        loads = [json.loads(line) for line in report]
    if proc.returncode != 0:  # the engine's root cause comes before the front end's long traceback
        errors = [line for line in proc.stderr.splitlines()
                  if line.startswith("error: ") or re.search(r"\w(Error|Exception)\b", line)]
        raise RuntimeError(f"{load_format} at TP={tp} failed:\n" + "\n".join(errors[:10]) + f"\n...\n{proc.stderr[-1500:]}")
    result = json.loads(proc.stdout.strip().splitlines()[-1])[0]
    found = {k: [float(x) for x in re.findall(p, proc.stderr)] for k, p in LOG.items()}
    weights = max([r["seconds"] for r in loads] or found["weights"], default=0.0)
    model_loading = max(found["model_loading"], default=0.0) or max(found["model_init"], default=0.0) + weights
    s = result["seconds"]
    init_engine = max(found["init_engine"], default=0.0)
    return {
        "import": s["import"], "engine": s["engine"], "first_token": s["generate"], "total": s["total"],
        "process": process,
        "weights": weights,
        "model_init": max(model_loading - weights, 0.0),
        "profile_kv_warmup": init_engine,
        "engine_start": max(s["engine"] - model_loading - init_engine, 0.0),
        "token_ids": result["token_ids"][0],
        "caches": result["caches"],
        "loads": loads,  # fast_sharded_state's own report per rank: staging wait and release
    }


def folders(args: argparse.Namespace) -> tuple[Path, Path, Path]:
    """The work folder, the output folder and the source model, made if missing."""
    work, out = Path(args.work), Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    source = Path(args.model or work / (f"source-{args.synthetic}" + (f"-{args.layers}-layers" if args.layers else "")))
    if not (source / "config.json").exists():
        synthesize(args.synthetic, source, args.layers)
    return work, out, source


def saved(work: Path, source: Path, tp: int, extra: list[str], caches: bool = False) -> Path:
    """The checkpoint the user saved of `source` at this TP size in --work (with its start-up caches for a
    new node); where there is none, the one line that says how to save it."""
    checkpoint = work / f"tp{tp}"
    manifest = read_manifest(checkpoint)
    if manifest is None or (caches and not manifest.caches):
        save = ["presharded-save", "--model", str(source), "--output", str(checkpoint), "-tp", str(tp),
                "--replace", "--start-caches" if caches else "--no-start-caches", *extra]
        raise UserError(f"no checkpoint{' with start-up caches' if caches else ''} at {checkpoint}: save it with "
                        f"`{shlex.join(save)}` (save_sharded_state.py), then run this again")
    return checkpoint


def run(args: argparse.Namespace, extra: list[str]) -> dict:
    work, out, source = folders(args)
    source_files = sorted(source.glob("*.safetensors"))
    report: dict = {"source": str(source), "source_bytes": sum(f.stat().st_size for f in source_files),
                    "runs": [], "dd": []}
    checkpoints = {tp: saved(work, source, tp, extra) for tp in args.tp}
    if args.throwaway:  # a machine's first engine start pays one-time warm-up (kernel JIT, caches): not counted
        timed_start(source, "dummy", args.tp[0], extra)
    for tp, checkpoint in checkpoints.items():
        manifest = read_manifest(checkpoint)
        rank_files = [checkpoint / s.path for s in manifest.shards if s.tp_rank == 0]
        rank_bytes = sum(f.stat().st_size for f in rank_files)
        every_rank = [checkpoint / s.path for s in manifest.shards]  # warm or cold for every rank, not rank 0 alone
        report["dd"].append({"tp": tp, "file": rank_files[0].name, "cold_gbps": round(dd_gbps(rank_files[0]), 2)})
        # formats take turns, so that a machine that drifts (its memory speed does) drifts for all of them
        for cache, repeat, spec in starts(args.formats, args.repeats, args.cold, args.warm):
            load_format, _ = parse_format(spec)
            model, files = (source, source_files) if load_format in ("auto", "dummy") else (checkpoint, every_rank)
            set_cache(files, warm=cache == "warm")
            row = timed_start(model, spec, tp, extra, tokens=args.max_tokens)
            row.update(tp=tp, format=spec, cache=cache, repeat=repeat, rank_bytes=rank_bytes,
                       gbps=round(rank_bytes / row["weights"] / 1e9, 2) if row["weights"] else None)
            report["runs"].append(row)
            (out / "bench.json").write_text(json.dumps(report, indent=1))  # kept if a later run fails
            print(f"TP={tp} {spec:<19} {cache}: weights {row['weights']:.2f} s "
                  f"({row['gbps']} GB/s), total {row['total']:.1f} s", file=sys.stderr, flush=True)
    return report


FRESH = {  # name: (load format, load script flags); a new node has no record of having made the caches: trusted
    "sharded_state": (SHARDED_STATE, ["--no-start-caches"]),
    "ours-no-caches": (FAST_FORMAT, ["--no-start-caches"]),
    "ours-caches": (FAST_FORMAT, [TRUST_FLAG]),
    "ours-caches-prefetch": (FAST_FORMAT, [TRUST_FLAG, "--prefetch"]),
    "snapshot": (FAST_FORMAT, ["--snapshot", TRUST_SNAPSHOT_FLAG]),  # restored, not started; GPUs only
}
WARM_AGAIN = ["sharded_state", "ours-caches", "snapshot"]  # the same node again: caches filled, files in page cache


def start_restored(checkpoint: Path, tp: int, extra: list[str], tokens: int = 1) -> dict:
    """The checkpoint's engine snapshot restored and asked for a token (presharded.generate --snapshot);
    its phases in timed_start's terms (no import, no profiling: a restore, a wake and the weights)."""
    cmd = [sys.executable, "-m", "presharded.generate", json.dumps([[str(checkpoint), FAST_FORMAT]]),
           "--prompts", json.dumps(["The quick brown fox"]), "--max-tokens", str(tokens), *FRESH["snapshot"][1],
           "-tp", str(tp), *extra]
    started = time.perf_counter()
    proc = subprocess.run(cmd, capture_output=True, text=True)
    process = round(time.perf_counter() - started, 3)  # from exec to exit, timed from outside
    result = json.loads(proc.stdout.strip().splitlines()[-1])[0] if proc.returncode == 0 else {}
    if not result.get("snapshot", {}).get("used"):
        warnings = [line for line in proc.stderr.splitlines() if line.startswith(("warning:", "error:"))]
        raise RuntimeError("the engine snapshot was not restored: " + "\n".join(warnings) + f"\n{proc.stderr[-1500:]}")
    s = result["snapshot"]["seconds"]
    return {"import": 0.0, "engine_start": sum(s.get(k, 0.0) for k in ("check", "restore", "cuda_restore", "wake")),
            "model_init": 0.0, "weights": s.get("weights", 0.0), "profile_kv_warmup": 0.0, "first_token": s["generate"],
            "total": result["seconds"]["total"], "process": process, "engine": 0.0,
            "token_ids": result["token_ids"][0], "caches": "snapshot", "snapshot": result["snapshot"], "loads": []}


def read_seconds(files: list[Path]) -> float:
    """How long `cat` takes to read `files` from a cold page cache: the disk's floor for a new node."""
    new_node(files)
    start = time.perf_counter()
    subprocess.run(["cat", *map(str, files)], stdout=subprocess.DEVNULL, check=True)
    return round(time.perf_counter() - start, 3)


def package_files() -> list[Path]:
    """The Python packages' files (vLLM, torch, ...): a new node reads them from disk too."""
    folders = {Path(p) for p in sys.path if "site-packages" in p or p.startswith("/root/site")}
    return [f for folder in folders if folder.is_dir() for f in folder.rglob("*") if f.is_file()]


def new_node(files: list[Path]) -> str:
    """The page cache as on a node that just booted, as far as this machine allows; how. Written back
    first (dirty pages are not dropped), then checked: not one page of `files` may be left in it."""
    os.sync()
    try:
        Path("/proc/sys/vm/drop_caches").write_text("3")
        how = "sync, drop_caches"
    except OSError:
        set_cache(files + package_files(), warm=False)
        how = "fsync, fadvise (the weights and the Python packages)"
    resident, total = resident_pages(files)
    if resident:
        raise RuntimeError(f"{resident} of the {total} pages of the image and the weights are still in the page "
                           f"cache after {how}: this would not be a new node's start")
    return how


def run_fresh(args: argparse.Namespace, extra: list[str]) -> dict:
    """A new node's start per format, then the same node warm, at each TP size."""
    work, out, source = folders(args)
    report: dict = {"source": str(source), "runs": []}
    checkpoints = {tp: saved(work, source, tp, extra, caches=True) for tp in args.tp}
    for tp, checkpoint in checkpoints.items():
        if "snapshot" in args.fresh_variants and not read_manifest(checkpoint).snapshots:
            made = subprocess.run([sys.executable, "-m", "presharded.snapshot_cli", str(checkpoint), "--json",
                                   TRUST_FLAG, "-tp", str(tp), *extra], capture_output=True, text=True)
            if made.returncode != 0:
                raise RuntimeError(f"presharded-snapshot at TP={tp} failed:\n{made.stderr[-3000:]}")
            report["snapshot"] = json.loads(made.stdout)
        manifest = read_manifest(checkpoint)
        rank_files = [checkpoint / s.path for s in manifest.shards]
        rank_bytes = sum(f.stat().st_size for f in rank_files) // tp
        image = [checkpoint / e.path for entries in manifest.snapshots.values() for e in entries]
        user_caches = {name: work / "user-caches" / name for name in FRESH}
        # Each warm start right after its own new-node start: what that start left (the checked image copy,
        # the workspace) is there, as on that node; the next new-node start removes it.
        for repeat, cache, name in [(repeat, cache, name) for repeat in range(args.repeats)
                                    for name in args.fresh_variants for cache in ("fresh", "warm")
                                    if cache == "fresh" or name in WARM_AGAIN]:
            load_format, flags = FRESH[name]
            env = {var: str(user_caches[name] / kind) for kind, var in KINDS.items()}
            floor = None
            if cache == "fresh":
                shutil.rmtree(user_caches[name], ignore_errors=True)
                shutil.rmtree(WORKSPACE / manifest.id, ignore_errors=True)
                shutil.rmtree(IMAGES / f"presharded-{os.getuid()}", ignore_errors=True)  # the checked image copy
                if name == "snapshot":  # what a restore reads, cold, right before it
                    floor = read_seconds(image + rank_files)
                report["evicted"] = new_node(image + rank_files)
            else:
                set_cache(rank_files, warm=True)
            if name == "snapshot":
                row = start_restored(checkpoint, tp, extra, tokens=args.max_tokens)
            else:
                row = timed_start(checkpoint, load_format, tp, [*flags, *extra], env, tokens=args.max_tokens)
            row.update(tp=tp, format=name, cache=cache, repeat=repeat, rank_bytes=rank_bytes, floor=floor,
                       gbps=round(rank_bytes / row["weights"] / 1e9, 2) if row["weights"] else None)
            report["runs"].append(row)
            (out / "bench.json").write_text(json.dumps(report, indent=1))
            print(f"TP={tp} {name:<24} {cache}: caches {row['caches']}, weights {row['weights']:.2f} s, "
                  f"total {row['total']:.1f} s, whole process {row['process']:.1f} s"
                  + (f", cat of what it reads {floor:.1f} s" if floor else ""), file=sys.stderr, flush=True)
    return report


def ratios(rows: list[dict], runs: list[dict]) -> list[str]:
    """A new node's start against the same node warm and vLLM's sharded_state (medians), and each restored
    new node against `cat` of its image and weights run right before it; all from whole processes timed
    from outside."""
    lines = []
    for tp in sorted({r["tp"] for r in rows}):
        took = {(r["format"], r["cache"]): r["process"] for r in rows if r["tp"] == tp}
        warm = min((v for (f, c), v in took.items() if c == "warm" and f != "snapshot"), default=None)
        for name in [f for f, c in took if c == "fresh" and f.startswith("ours-caches")]:
            if warm:
                lines.append(f"TP={tp}: new node {name} / fastest warm start = {took[name, 'fresh'] / warm:.2f}")
            if ("sharded_state", "fresh") in took:
                lines.append(f"TP={tp}: new node sharded_state / {name} = "
                             f"{took['sharded_state', 'fresh'] / took[name, 'fresh']:.2f}")
        for run in [r for r in runs if r["tp"] == tp and r["format"] == "snapshot" and r.get("floor")]:
            lines.append(f"TP={tp}: new node snapshot, run {run['repeat'] + 1}: {run['process']:.2f} s / cat of its "
                         f"image and weights {run['floor']:.2f} s = {run['process'] / run['floor']:.2f}")
        if ("snapshot", "fresh") in took:
            for other in ("ours-caches", "ours-caches-prefetch", "sharded_state"):
                if (other, "fresh") in took:
                    restored = took["snapshot", "fresh"]
                    lines.append(f"TP={tp}: new node {other} / snapshot = {took[other, 'fresh'] / restored:.2f}")
    return lines


def same_tokens(runs: list[dict]) -> list[str]:
    """Whether every start that read the weights gave the same greedy tokens, per TP size."""
    lines = []
    for tp in sorted({r["tp"] for r in runs}):
        seen = {tuple(r["token_ids"]) for r in runs if r["tp"] == tp and parse_format(r["format"])[0] != "dummy"}
        count = len(next(iter(seen))) if seen else 0
        lines.append(f"TP={tp}: {count} greedy tokens " + ("identical in every start that read the weights"
                     if len(seen) == 1 else f"differ: {len(seen)} different sequences"))
    return lines


def starts(formats: list[str], repeats: int, cold: bool, warm: bool = True) -> list[tuple[str, int, str]]:
    """(cache, repeat, format) of every start, in order: cold ones first, each
    round going once through the formats; `dummy` reads nothing, so once, warm."""
    order = []
    for cache in (["cold"] if cold else []) + (["warm"] if warm else []):
        for repeat in range(repeats):
            order += [(cache, repeat, spec) for spec in formats
                      if parse_format(spec)[0] != "dummy" or (cache, repeat) == ("warm", 0)]
    return order


PHASES = ["import", "engine_start", "model_init", "weights", "profile_kv_warmup", "first_token"]


def summarize(report: dict) -> list[dict]:
    groups: dict[tuple, list[dict]] = {}
    for r in report["runs"]:
        groups.setdefault((r["tp"], r["format"], r["cache"]), []).append(r)
    rows = []
    for (tp, fmt, cache), runs in groups.items():
        row = {"tp": tp, "format": fmt, "cache": cache, "n": len(runs)}
        for key in [*PHASES, "total", "process"]:
            row[key] = statistics.median(r[key] for r in runs)
        row["gbps"] = round(runs[0]["rank_bytes"] / row["weights"] / 1e9, 2) if row["weights"] else None
        row.update({key: round(row[key], 3) for key in [*PHASES, "total", "process"]})
        rows.append(row)
    return rows


def table(rows: list[dict]) -> str:
    head = ["TP", "format", "cache", "n", "weights s", "GB/s/rank", *PHASES[:3], *PHASES[4:], "total s",
            "whole process s"]
    lines = ["| " + " | ".join(head) + " |", "|" + " --- |" * len(head)]
    for r in rows:
        cells = [r["tp"], r["format"], r["cache"], r["n"], r["weights"], r["gbps"] or "-",
                 *(r[k] for k in PHASES[:3]), *(r[k] for k in PHASES[4:]), r["total"], r["process"]]
        lines.append("| " + " | ".join(str(c) for c in cells) + " |")
    return "\n".join(lines)


def chart(rows: list[dict], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    labels = [f"TP{r['tp']} {r['format']}\n{r['cache']}" for r in rows]
    fig, ax = plt.subplots(figsize=(max(6, 1.3 * len(rows)), 5))
    bottom = [0.0] * len(rows)
    for phase in PHASES:
        values = [r[phase] for r in rows]
        ax.bar(labels, values, bottom=bottom, label=phase.replace("_", " "))
        bottom = [b + v for b, v in zip(bottom, values)]
    ax.set_ylabel("seconds (median)")
    ax.set_title("vLLM start-up to first token, by phase")
    ax.legend(fontsize=8)
    plt.xticks(fontsize=7, rotation=20, ha="right")
    fig.tight_layout()
    fig.savefig(path, dpi=120)


@exits_cleanly
def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    source = parser.add_mutually_exclusive_group(required=True)
    source.add_argument("--model", help="a model folder with safetensors weights")
    source.add_argument("--synthetic", choices=["tiny", *ARCHITECTURES], help="make a model of these shapes")
    parser.add_argument("--layers", type=int, help="with --synthetic: this many of its layers (a smaller disk)")
    parser.add_argument("--tp", type=lambda s: [int(x) for x in s.split(",")], default=[1])
    parser.add_argument("--formats", type=lambda s: s.split(","),
                        default=["dummy", "auto", SHARDED_STATE, FAST_FORMAT],
                        help="load formats to start with; dummy reads no weights: vLLM's own floor; "
                        "FORMAT:KEY=VALUE passes loader options, e.g. fast_sharded_state:chunk_mib=64")
    parser.add_argument("--no-throwaway", dest="throwaway", action="store_false",
                        help="skip the uncounted first start that takes the machine's one-time warm-up")
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--max-tokens", type=int, default=1,
                        help="greedy tokens per start (the last phase's time covers them all); every format's are "
                        "compared")
    parser.add_argument("--no-cold", dest="cold", action="store_false", help="skip the cold-cache runs")
    parser.add_argument("--no-warm", dest="warm", action="store_false",
                        help="skip the warm-cache runs (and dummy, which is warm only)")
    parser.add_argument("--fresh", action="store_true",
                        help="a new node instead: empty compile caches, cold page cache; see above")
    parser.add_argument("--fresh-variants", type=lambda s: s.split(","), default=list(FRESH),
                        help=f"with --fresh: which starts, of {','.join(FRESH)}")
    parser.add_argument("--work", default="build/bench", help="where models and checkpoints are written")
    parser.add_argument("--out", default="build/bench", help="where bench.json and bench.png go")
    args, extra = parser.parse_known_args()  # the rest goes to every engine, e.g. --enforce-eager
    report = run_fresh(args, extra) if args.fresh else run(args, extra)
    rows = summarize(report)
    report["summary"] = rows
    report["ratios"] = (ratios(rows, report["runs"]) if args.fresh else []) + same_tokens(report["runs"])
    Path(args.out, "bench.json").write_text(json.dumps(report, indent=1))
    print(table(rows))
    print("\n".join(report["ratios"]))
    try:
        chart(rows, Path(args.out) / "bench.png")
    except ImportError:
        print("matplotlib is not installed: no chart", file=sys.stderr)


if __name__ == "__main__":
    main()
