"""The plugin registers our load formats in every vLLM process, yet leaves
vLLM's model loaders unimported in a process that loads no model."""

import subprocess
import sys

PROBE = """
import sys
from vllm.plugins import load_general_plugins
load_general_plugins()
print("vllm.model_executor.model_loader" in sys.modules)
from vllm.config import LoadConfig
from vllm.model_executor.model_loader import get_model_loader
print(type(get_model_loader(LoadConfig(load_format="fast_sharded_state"))).__name__)
"""


def test_plugin_registers_formats_when_vllm_imports_its_loaders():
    proc = subprocess.run([sys.executable, "-c", PROBE], capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert proc.stdout.split() == ["False", "FastShardedStateLoader"]
