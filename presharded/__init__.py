"""Pre-sharded vLLM checkpoints: save each rank's slice once, start fast many times.

save_sharded_state.py and load_sharded_state.py show the steps; these are the
package's public names, imported on first use: vLLM imports this package in
every engine process (through its plugin), which must not pay for torch here."""

import importlib

__version__ = "0.1.0"
_PUBLIC = {
    "Save": "save", "add_save_flags": "save",
    "Load": "load", "add_checkpoint_flags": "load",
    "Manifest": "manifest", "read_manifest": "manifest",
    "check_for_load": "load_checks", "verify_checkpoint": "load_checks",
    "greedy_tokens": "generate",
    "use_set": "start_caches", "record_set": "start_caches",
    "UserError": "errors", "exits_cleanly": "errors",
}
__all__ = sorted(_PUBLIC)


def __getattr__(name: str):
    if name not in _PUBLIC:
        raise AttributeError(f"module 'presharded' has no attribute {name!r}")
    return getattr(importlib.import_module(f"presharded.{_PUBLIC[name]}"), name)
