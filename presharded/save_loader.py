"""The load format that saves. Inside every worker it loads the source like
`auto`, then writes that rank's state as it is before
process_weights_after_loading: the logical weights, which loading and
post-processing again rebuild exactly, on every backend and quantization."""

import dataclasses
import time
from pathlib import Path

from torch import nn

from presharded.vllm_compat import DefaultModelLoader, parallel_ranks, unique_tensors
from presharded.writer import SAVE_FORMAT, SaveRequest, write_rank, write_rank_record


class SavingModelLoader(DefaultModelLoader):
    def __init__(self, load_config) -> None:
        extra = dict(load_config.model_loader_extra_config)
        self.request = SaveRequest(**extra.pop(SAVE_FORMAT))
        source_config = dataclasses.replace(
            load_config,
            load_format=self.request.source_load_format,
            model_loader_extra_config=extra,
        )
        super().__init__(source_config)

    def load_weights(self, model: nn.Module, model_config) -> None:
        super().load_weights(model, model_config)
        pp_rank, tp_rank = parallel_ranks()
        folder = Path(self.request.folder)
        start = time.perf_counter()
        shards = write_rank(
            unique_tensors(model.state_dict()),
            folder,
            pattern=self.request.file_pattern,
            pp_rank=pp_rank,
            tp_rank=tp_rank,
            max_file_size=self.request.max_file_size,
        )
        write_rank_record(
            folder,
            shards,
            dtype=str(model_config.dtype).removeprefix("torch."),
            quantization=model_config.quantization,
            architecture=model_config.hf_config.architectures[0],
            write_seconds=time.perf_counter() - start,
        )
