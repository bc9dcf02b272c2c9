"""vLLM plugin (entry point group `vllm.general_plugins`): vLLM calls
`register` in every process it starts, workers included, once this package is
installed. Our load formats are registered when vLLM imports its model
loaders, so that a process that never loads a model (the front end, the API
server) does not pay for importing them. A refusal of ours inside the engine
ends a server in one line as it ends our scripts (presharded/errors.py)."""

import importlib.abc
import importlib.util
import sys

from presharded.engine_output import refusals_in_one_line
from presharded.vllm_compat import LOADER_PACKAGE


def register() -> None:
    refusals_in_one_line()
    if LOADER_PACKAGE in sys.modules:
        register_loaders()
    elif not any(isinstance(f, AfterImport) for f in sys.meta_path):
        sys.meta_path.insert(0, AfterImport())


def register_loaders() -> None:
    from presharded.fast_loader import FastShardedStateLoader
    from presharded.formats import FAST_FORMAT, SAVE_FORMAT
    from presharded.save_loader import SavingModelLoader
    from presharded.vllm_compat import register_model_loader

    register_model_loader(SAVE_FORMAT)(SavingModelLoader)
    register_model_loader(FAST_FORMAT)(FastShardedStateLoader)


class AfterImport(importlib.abc.MetaPathFinder):
    """Finds vLLM's model loader package as Python would, and registers our
    loaders right after it has run."""

    def find_spec(self, name, path, target=None):
        if name != LOADER_PACKAGE:
            return None
        sys.meta_path.remove(self)
        spec = importlib.util.find_spec(name)
        run = spec.loader.exec_module

        def run_then_register(module) -> None:
            run(module)
            register_loaders()

        spec.loader.exec_module = run_then_register
        return spec
