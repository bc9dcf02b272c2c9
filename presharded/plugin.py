"""vLLM plugin (entry point group `vllm.general_plugins`): vLLM calls
`register` in every process it starts, workers included, once this package is
installed."""


def register() -> None:
    from presharded.fast_loader import FAST_FORMAT, FastShardedStateLoader
    from presharded.save_loader import SAVE_FORMAT, SavingModelLoader
    from presharded.vllm_compat import register_model_loader

    register_model_loader(SAVE_FORMAT)(SavingModelLoader)
    register_model_loader(FAST_FORMAT)(FastShardedStateLoader)
