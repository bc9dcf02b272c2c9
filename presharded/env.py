"""Every environment variable of ours, in one place: those a user sets, and
those through which our processes tell one another something (a script to
the engine it starts, the engine's workers back to the script)."""

# Set by a user.
TRUST_ENV = "PRESHARDED_TRUST_START_CACHES"  # =1: --trust-start-caches (presharded/trust.py)
TRUST_SNAPSHOT_ENV = "PRESHARDED_TRUST_SNAPSHOT"  # =1: --trust-snapshot
MODEL_ENV = "PRESHARDED_MODEL"  # set by presharded-caches --export: the folder to serve (presharded/start_caches.py)

# Between our processes.
ENGINE_OF_ENV = "PRESHARDED_ENGINE_OF"  # every process under one of our scripts carries the script's pid
REFUSAL_ENV = "PRESHARDED_REFUSAL"  # where code inside vLLM's engine writes why it refused (presharded/errors.py)
PROGRESS_ENV = "PRESHARDED_PROGRESS"  # =1: the workers show progress bars (the script decides: presharded/progress.py)
LOAD_REPORT_ENV = "PRESHARDED_LOAD_REPORT"  # a file where fast_sharded_state appends one JSON line per rank
