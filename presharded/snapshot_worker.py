"""What an engine snapshot's workers gain (`--worker-extension-cls`): vLLM's
workers, asleep before the dump, keep what the checkpoint cannot give back,
and refill their weights after the restore. Called by name through
collective_rpc: a function cannot cross the server's socket to its engine core."""

import os
from pathlib import Path

import psutil
import torch
from torch import nn

from presharded.fast_loader import FastShardedStateLoader
from presharded.snapshot_inbox import redirect
from presharded.snapshot_weights import PREFIX, held, kept_bytes, refill_plan
from presharded.vllm_compat import is_cpu, parallel_ranks, sleep_allocations, unique_tensors
from presharded.writer import CHUNK_SIZE, write_file


class SnapshotWorker:
    def presharded_asleep(self) -> dict[str, float]:
        """Asleep: every GPU block not in use given back (what is left goes into the image), the output
        to /dev/null (a server's engine core writes to its starter's pipe otherwise). The GiB the image
        will hold of this process: its resident memory and of it the anonymous (CRIU dumps those pages), the
        GPU's still in use and torch's part of that (its own pool, CUDA graphs' pools)."""
        redirect(None)
        gib = resident_gib()
        if torch.cuda.is_available():
            torch.cuda.empty_cache()
            free, total = torch.cuda.mem_get_info()
            gib.update(gpu_in_use=(total - free) / 2**30, torch=0.0, graphs=0.0)
            asleep = sleep_allocations()  # sleep mode's, unmapped now
            for segment in torch.cuda.memory_snapshot():
                if segment["address"] not in asleep:
                    pool = "torch" if tuple(segment["segment_pool_id"]) == (0, 0) else "graphs"
                    gib[pool] += segment["total_size"] / 2**30
        return {k: round(v, 3) for k, v in gib.items()}

    def presharded_keep(self, folder: str, kept_as: str) -> int:
        """Awake, before sleep mode frees the weights: what the checkpoint's files cannot give back
        (presharded/snapshot_weights.py) written to `folder`, found again at `kept_as` in the model
        folder; the plan stays in this process, hence in the image. The bytes kept."""
        runner = self.model_runner
        model = runner.get_model()
        loader = FastShardedStateLoader(self.vllm_config.load_config)
        if loader.staging:  # not read with: nothing of it goes into the image
            loader.staging.release()
        files, _ = loader.rank_files(runner.model_config)
        name = "rank-pp{}-tp{}.safetensors".format(*parallel_ranks())
        params = unique_tensors(model.state_dict(), skip_views=True)
        self.presharded_plan = refill_plan(params, freed_storages(model), files, f"{kept_as}/{name}")
        if self.presharded_plan.path:
            # Not pinned: torch would keep pinned memory cached, and the image with it.
            buffers = [torch.empty(CHUNK_SIZE, dtype=torch.uint8) for _ in range(2)]
            write_file(Path(folder) / name, {f"{PREFIX}{k}": t for k, t in self.presharded_plan.kept.items()},
                       buffers)
        return kept_bytes(self.presharded_plan)

    def presharded_restored(self, log: str, weights: bool, s3: dict | None = None) -> None:
        """Restored, before the wake: the output to `log`; if the weights were freed (sleep level 2),
        our loader made now, so that its staging buffers are pinned while the engine wakes; with `s3`,
        it reads them from the checkpoint there, with the restoring command's AWS environment."""
        redirect(log)
        if weights:
            self.presharded_loader = FastShardedStateLoader(self.vllm_config.load_config)
            if s3:
                os.environ.update(s3["env"])
                self.presharded_loader.s3 = s3["url"]

    def presharded_refill(self) -> None:
        """Woken: the weights back from the checkpoint's files and the snapshot's own, as presharded_keep
        planned."""
        runner = self.model_runner
        self.presharded_loader.refill(runner.get_model(), runner.model_config, self.presharded_plan)
        if torch.cuda.is_available():
            torch.cuda.synchronize()


def resident_gib() -> dict[str, float]:
    """This process's resident memory and of it the anonymous, in GiB (statm: `shared` is what files and
    shared memory back)."""
    memory = psutil.Process().memory_info()
    return {"rss": memory.rss / 2**30, "anon": (memory.rss - memory.shared) / 2**30}


def freed_storages(model: nn.Module) -> dict[str, torch.Tensor]:
    """The model's storages that sleep mode frees: those in its weights' memory pool (on a CPU, with
    neither pool nor sleep mode, every storage the model holds)."""
    if is_cpu():
        return held(model, lambda address: True)
    pool = [(ptr, ptr + size) for ptr, size in sleep_allocations("weights").items()]
    return held(model, lambda address: any(lo <= address < hi for lo, hi in pool))


SNAPSHOT_WORKER = f"{__name__}.SnapshotWorker"
