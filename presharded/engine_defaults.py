"""Engine settings where the user set none: for a save (it serves no
requests) and for vLLM's CPU build (which needs a KV cache size, its
threads bound per rank, and a compile mode for pipeline stages)."""

import argparse
import os

from presharded.flags import fill_unset, is_default


def cpu_binding(world_size: int) -> str:
    """VLLM_CPU_OMP_THREADS_BIND giving each rank its own cores, e.g. `0|1`."""
    cpus = sorted(os.sched_getaffinity(0))
    if len(cpus) < world_size:
        return "nobind"
    per_rank = len(cpus) // world_size
    blocks = [cpus[i * per_rank : (i + 1) * per_rank] for i in range(world_size)]
    return "|".join(",".join(map(str, block)) for block in blocks)


# Saving serves no requests: no CUDA graphs, one short sequence, a small KV cache.
SAVE_ENGINE_DEFAULTS = {
    "enforce_eager": True,
    "max_model_len": 256,
    "max_num_seqs": 1,
    "max_num_batched_tokens": 256,
    "kv_cache_memory_bytes": 256 * 2**20,
}


def apply_engine_defaults(args: argparse.Namespace, parser: argparse.ArgumentParser, *, saving: bool) -> None:
    """Workable settings where the user set none, for saving and for CPU."""
    from presharded.vllm_compat import is_cpu

    if saving:
        fill_unset(args, parser, SAVE_ENGINE_DEFAULTS)
    if not is_cpu():
        return
    if args.kv_cache_memory_bytes is None:
        os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")  # GiB; else 90 % of RAM
    world_size = args.tensor_parallel_size * args.pipeline_parallel_size
    if world_size > 1:
        os.environ.setdefault("VLLM_CPU_OMP_THREADS_BIND", cpu_binding(world_size))
    if args.pipeline_parallel_size > 1 and is_default(args, parser, "compilation_config"):
        # Pipeline stages on CPU generate only with this mode, not with enforce_eager.
        args.compilation_config = {"mode": 2, "backend": "eager"}
        args.enforce_eager = False
