"""Every import of vLLM internals lives here: they move between releases.
Checked against vLLM 0.26 (CUDA) and 0.32 (CPU)."""

import importlib
import os
import platform
from collections import Counter

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
    "config_refusal",
    "is_request_error",
    "is_image_error",
    "VLLM_VERSION",
    "is_cpu",
    "model_facts",
    "online_quantized_layers",
    "parallel_ranks",
    "parallel_sizes",
    "bind",
    "engine_client",
    "serve_app",
    "serve_parser",
    "register_model_loader",
    "run_workers",
    "shut_down",
    "sleep_allocations",
    "unique_tensors",
]

VLLM_VERSION: str = vllm.__version__
try:  # a request vLLM refuses (a prompt longer than the context): ValueError on 0.26
    from vllm.exceptions import VLLMClientError

    REQUEST_ERRORS: tuple[type[Exception], ...] = (ValueError, AssertionError, VLLMClientError)
except ImportError:
    REQUEST_ERRORS = (ValueError, AssertionError)
# Where vLLM checks a request before running it, on 0.26 and 0.32; a ValueError raised elsewhere during a
# request is the model failing to run (an in-process engine raises it here as it is). Its multi-modal
# processor asserts that the prompt has a place for each image.
REQUEST_CHECKS = ("/vllm/v1/engine/", "/vllm/sampling_params.py", "/vllm/inputs/")
IMAGE_CHECKS = ("/vllm/multimodal/",)


def raised_in(e: BaseException) -> str:
    """The file of the frame that raised `e`."""
    tb, where = e.__traceback__, ""
    while tb is not None:
        where, tb = tb.tb_frame.f_code.co_filename, tb.tb_next
    return where.replace(os.sep, "/")


def config_refusal(e: BaseException) -> str | None:
    """vLLM's refusal of the engine flags, raised as it builds the engine's config (its configs are
    pydantic dataclasses, checked against the model there): the first sentence of its reason, as our
    one line; None for any other error."""
    import pydantic

    if not isinstance(e, pydantic.ValidationError):
        return None
    errors = e.errors()
    reason = errors[0]["msg"].removeprefix("Value error, ") if errors else str(e).splitlines()[0]
    return f"vLLM refused the engine flags ({e.title}): {reason.split('. ')[0]}; change the flag it names"


def is_request_error(e: BaseException) -> bool:
    """Whether vLLM refused the request itself, not failed running the model on it."""
    if not isinstance(e, REQUEST_ERRORS):
        return False
    if type(e) not in (ValueError, AssertionError):  # 0.32's client errors: the engine's answer to the request
        return True
    return any(part in raised_in(e) for part in REQUEST_CHECKS + IMAGE_CHECKS)


def is_image_error(e: BaseException) -> bool:
    """Whether vLLM's multi-modal processor refused the request (an image without its placeholder)."""
    return isinstance(e, REQUEST_ERRORS) and any(part in raised_in(e) for part in IMAGE_CHECKS)


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


def unique_tensors(state: dict[str, torch.Tensor], skip_views: bool = False) -> dict[str, torch.Tensor]:
    """The state dict as vLLM's sharded_state loader expects it: tensors that
    share memory with another (tied weights, fused views) appear once. vLLM's
    filter takes contiguous tensors only; one that is not is kept when it
    shares its memory with no other. A non-contiguous view of another tensor
    cannot be saved; with `skip_views` it is left out (a snapshot's refill
    reads whole tensors and keeps the rest as bytes: MLA's W_UK_T and W_UV,
    views of one matrix that vLLM makes after loading)."""
    from vllm.model_executor.model_loader.sharded_state_loader import ShardedStateLoader

    unique = ShardedStateLoader._filter_subtensors({k: t for k, t in state.items() if t.is_contiguous()})
    storages = Counter((t.device, t.untyped_storage().data_ptr()) for t in state.values() if t.numel())
    for name, t in state.items():
        if not t.is_contiguous():
            if storages[t.device, t.untyped_storage().data_ptr()] > 1:
                if skip_views:
                    continue
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


def model_facts(llm) -> dict:
    """What a manifest records of the model an `LLM` runs: its dtype, quantization and architecture."""
    config = llm.llm_engine.model_config
    return {"dtype": str(config.dtype).removeprefix("torch."), "quantization": config.quantization,
            "architecture": config.hf_config.architectures[0]}


def shut_down(llm) -> None:
    """Stop an `LLM`'s engine and give its memory back, before another engine starts on the same devices."""
    import gc

    llm.llm_engine.engine_core.shutdown()
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


def sleep_allocations(tag: str | None = None) -> dict[int, int]:
    """Sleep mode's allocations on the GPU (those with `tag`, e.g. "weights", if given): address -> size.
    Empty where there is no CUDA."""
    if not torch.cuda.is_available():
        return {}
    from vllm.device_allocator.cumem import CuMemAllocator

    return {ptr: data.handle[1] for ptr, data in CuMemAllocator.get_instance().pointer_to_data.items()
            if tag is None or data.tag == tag}


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


async def serve_app(engine, listen: str, sock, args):
    """The app built on `engine` and served on `sock` until the server stops; its shutdown task."""
    return await _api_server()[2].build_and_serve(engine, listen, sock, args)
