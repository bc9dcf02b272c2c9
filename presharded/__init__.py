"""Pre-sharded vLLM checkpoints: save each rank's slice once, start fast many times."""

__version__ = "0.1.0"
