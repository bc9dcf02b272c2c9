"""Every import of vLLM internals lives here: they move between releases.
Checked against vLLM 0.26 (CUDA) and 0.32 (CPU)."""

import importlib
import platform
from collections import Counter
from pathlib import Path

import torch
import vllm
from torch import nn
from vllm.distributed.parallel_state import get_pp_group, get_tp_group
from vllm.platforms import current_platform
from vllm.utils.argparse_utils import FlexibleArgumentParser

__all__ = [
    "BaseModelLoader",
    "device_kind",
    "finish_online_quantization",
    "DefaultModelLoader",
    "FlexibleArgumentParser",
    "REQUEST_ERRORS",
    "VLLM_VERSION",
    "is_cpu",
    "online_quantized_layers",
    "parallel_ranks",
    "parallel_sizes",
    "SNAPSHOT_WORKER",
    "SnapshotWorker",
    "bind",
    "engine_client",
    "serve",
    "serve_parser",
    "register_model_loader",
    "run_workers",
    "shut_down",
    "unique_tensors",
]

VLLM_VERSION: str = vllm.__version__
try:  # a request vLLM refuses (a prompt longer than the context): ValueError on 0.26
    from vllm.exceptions import VLLMClientError

    REQUEST_ERRORS: tuple[type[Exception], ...] = (ValueError, VLLMClientError)
except ImportError:
    REQUEST_ERRORS = (ValueError,)
LOADER_PACKAGE = "vllm.model_executor.model_loader"
# vLLM's model loaders are imported on first use: importing them is slow, and
# a process that never loads a model (the front end, the API server) need not.
LAZY = {
    "register_model_loader": LOADER_PACKAGE,
    "BaseModelLoader": f"{LOADER_PACKAGE}.base_loader",
    "DefaultModelLoader": f"{LOADER_PACKAGE}.default_loader",
}


def __getattr__(name: str):
    if name not in LAZY:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    return getattr(importlib.import_module(LAZY[name]), name)


def is_cpu() -> bool:
    return current_platform.is_cpu()


def device_kind() -> str:
    """The device compiled code is for, e.g. `NVIDIA-H200-sm90`, read through
    NVML: CUDA initialized in this process would make vLLM spawn its engine
    process instead of forking it, which imports vLLM again (16 s on an H200)."""
    if is_cpu():
        return f"cpu-{platform.machine()}"
    name = current_platform.get_device_name().replace(" ", "-")
    capability = current_platform.get_device_capability()
    return f"{name}-sm{capability.major}{capability.minor}" if capability else name


def parallel_ranks() -> tuple[int, int]:
    """(pipeline stage, tensor-parallel rank) of the calling worker."""
    return get_pp_group().rank_in_group, get_tp_group().rank_in_group


def parallel_sizes() -> tuple[int, int]:
    """(pipeline-parallel size, tensor-parallel size) of the running engine."""
    return get_pp_group().world_size, get_tp_group().world_size


def unique_tensors(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """The state dict as vLLM's sharded_state loader expects it: tensors that
    share memory with another (tied weights, fused views) appear once. vLLM's
    filter takes contiguous tensors only; one that is not is kept when it
    shares its memory with no other."""
    from vllm.model_executor.model_loader.sharded_state_loader import ShardedStateLoader

    unique = ShardedStateLoader._filter_subtensors({k: t for k, t in state.items() if t.is_contiguous()})
    storages = Counter((t.device, t.untyped_storage().data_ptr()) for t in state.values() if t.numel())
    for name, t in state.items():
        if not t.is_contiguous():
            if storages[t.device, t.untyped_storage().data_ptr()] > 1:
                raise RuntimeError(f"{name} ({tuple(t.shape)}, stride {t.stride()}, {t.dtype}) is a non-contiguous "
                                   "view of another tensor: it cannot be saved")
            unique[name] = t
    return {k: unique[k] for k in state if k in unique}


def online_quantized_layers(model: nn.Module) -> dict[str, nn.Module]:
    """Layers vLLM quantizes while it loads them (`--quantization fp8` over
    bf16 weights): their weights wait on the meta device, and each layer is
    quantized as soon as all of its weights have arrived."""
    return {name: m for name, m in model.named_modules()
            if getattr(getattr(m, "quant_method", None), "uses_meta_device", False)}


def finish_online_quantization(model: nn.Module, model_config) -> None:
    """Quantize now the online-quantized layers that vLLM leaves for after
    loading (a layer whose bias was loaded before its weight: the weight waits
    on the meta device), as vLLM's own load_model would next."""
    from vllm.model_executor.model_loader.reload import finalize_layerwise_processing

    finalize_layerwise_processing(model, model_config)


def run_workers(engine_args, wait) -> None:
    """This node's workers of a multi-node engine whose driver runs on another
    node (what `vllm serve --headless` runs), until `wait(failed)` returns."""
    from vllm.v1.executor.multiproc_executor import MultiprocExecutor

    executor = MultiprocExecutor(engine_args.create_engine_config(headless=True), monitor_workers=False)
    executor.start_worker_monitor()  # a thread: a worker that dies shuts the others down
    try:
        wait(lambda: executor.is_failed)
    finally:
        executor.shutdown()


def shut_down(llm) -> None:
    """Stop an `LLM`'s engine and give its memory back, before another engine starts on the same devices."""
    import gc

    llm.llm_engine.engine_core.shutdown()
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


class SnapshotWorker:
    """What an engine snapshot's worker gains (`--worker-extension-cls`), called by name through
    collective_rpc: a function cannot cross the server's socket to its engine core."""

    def presharded_asleep(self) -> dict[str, float]:
        """Asleep: every GPU block not in use given back (what is left goes into the image), the output
        to /dev/null (a server's engine core writes to its starter's pipe otherwise). The GiB the image
        will hold of this process: its resident memory, the GPU's still in use and torch's part of that
        (its own pool, CUDA graphs' pools)."""
        import psutil

        from presharded.snapshot import redirect

        redirect(None)
        gib = {"rss": psutil.Process().memory_info().rss / 2**30}
        if torch.cuda.is_available():
            from vllm.device_allocator.cumem import CuMemAllocator

            torch.cuda.empty_cache()
            free, total = torch.cuda.mem_get_info()
            gib.update(gpu_in_use=(total - free) / 2**30, torch=0.0, graphs=0.0)
            asleep = CuMemAllocator.get_instance().pointer_to_data  # sleep mode's, unmapped now
            for segment in torch.cuda.memory_snapshot():
                if segment["address"] not in asleep:
                    pool = "torch" if tuple(segment["segment_pool_id"]) == (0, 0) else "graphs"
                    gib[pool] += segment["total_size"] / 2**30
        return {k: round(v, 3) for k, v in gib.items()}

    def presharded_keep(self, folder: str, kept_as: str) -> int:
        """Awake, before sleep mode frees the weights: what the checkpoint's files cannot give back
        (presharded/snapshot_weights.py) written to `folder`, found again at `kept_as` in the model
        folder; the plan stays in this process, hence in the image. The bytes kept."""
        from presharded.fast_loader import FastShardedStateLoader
        from presharded.snapshot_weights import PREFIX, kept_bytes, plan
        from presharded.writer import CHUNK_SIZE, write_file

        runner = self.model_runner
        model = runner.get_model()
        loader = FastShardedStateLoader(self.vllm_config.load_config)
        if loader.staging:  # not read with: nothing of it goes into the image
            loader.staging.release()
        files, _ = loader.rank_files(runner.model_config)
        name = "rank-pp{}-tp{}.safetensors".format(*parallel_ranks())
        self.presharded_plan = plan(unique_tensors(model.state_dict()), freed_storages(model), files,
                                    f"{kept_as}/{name}")
        if self.presharded_plan.path:
            # Not pinned: torch would keep pinned memory cached, and the image with it.
            buffers = [torch.empty(CHUNK_SIZE, dtype=torch.uint8) for _ in range(2)]
            write_file(Path(folder) / name, {f"{PREFIX}{k}": t for k, t in self.presharded_plan.kept.items()},
                       buffers)
        return kept_bytes(self.presharded_plan)

    def presharded_restored(self, log: str, weights: bool) -> None:
        """Restored, before the wake: the output to `log`; if the weights were freed (sleep level 2),
        our loader made now, so that its staging buffers are pinned while the engine wakes."""
        from presharded.fast_loader import FastShardedStateLoader
        from presharded.snapshot import redirect

        redirect(log)
        if weights:
            self.presharded_loader = FastShardedStateLoader(self.vllm_config.load_config)

    def presharded_refill(self) -> None:
        """Woken: the weights back from the checkpoint's files and the snapshot's own, as presharded_keep
        planned."""
        runner = self.model_runner
        self.presharded_loader.refill(runner.get_model(), runner.model_config, self.presharded_plan)
        if torch.cuda.is_available():
            torch.cuda.synchronize()


def freed_storages(model: nn.Module) -> dict[str, torch.Tensor]:
    """The model's storages that sleep mode frees: those in its weights' memory pool (on a CPU, with
    neither pool nor sleep mode, every storage the model holds)."""
    from presharded.snapshot_weights import held

    if is_cpu():
        return held(model, lambda address: True)
    from vllm.device_allocator.cumem import CuMemAllocator

    pool = [(ptr, ptr + data.handle[1]) for ptr, data in CuMemAllocator.get_instance().pointer_to_data.items()
            if data.tag == "weights"]
    return held(model, lambda address: any(lo <= address < hi for lo, hi in pool))


SNAPSHOT_WORKER = f"{__name__}.SnapshotWorker"


def _api_server():
    try:  # 0.32
        from vllm.entrypoints.launchers import cli_args, launcher
        from vllm.entrypoints.launchers.api_server import entry
        return cli_args, launcher, entry
    except ImportError:  # 0.26
        from vllm.entrypoints.openai import api_server, cli_args
        return cli_args, api_server, api_server


def serve_parser() -> FlexibleArgumentParser:
    """`vllm serve`'s parser: every engine and server flag."""
    cli_args = _api_server()[0]
    return cli_args.make_arg_parser(FlexibleArgumentParser(description="vLLM's OpenAI-compatible server"))


def engine_client(args):
    """An async context: the server's engine client (its engine core in a child process)."""
    return _api_server()[2].build_async_engine_client(args)


def bind(args) -> tuple[str, object]:
    """The server's socket, bound to --host/--port (or --uds): its address and the socket."""
    return _api_server()[1].setup_server(args, reuse_port=False)


async def serve(engine, listen: str, sock, args):
    """The app built on `engine` and served on `sock` until the server stops; its shutdown task."""
    return await _api_server()[2].build_and_serve(engine, listen, sock, args)
