"""The load formats that read or write a pre-sharded checkpoint: vLLM's own,
and the two this package registers with vLLM (presharded/plugin.py)."""

SHARDED_STATE = "sharded_state"  # vLLM's own loader of pre-sharded files
FAST_FORMAT = "fast_sharded_state"  # ours: presharded/fast_loader.py
SAVE_FORMAT = "presharded_save"  # ours, the one that saves: presharded/save_loader.py
CHECKPOINT_FORMATS = (SHARDED_STATE, FAST_FORMAT)
