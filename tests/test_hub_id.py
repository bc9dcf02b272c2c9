"""--model may be a hub id: resolved by huggingface_hub (here from a real,
offline Hugging Face cache, since this machine reaches no hub)."""

import shutil
import subprocess
import sys

from conftest import ROOT, same_weights, script_env
from presharded.manifest import read_manifest

REVISION = "0123456789abcdef0123456789abcdef01234567"


def test_save_from_a_hub_id(tiny_model, checkpoints, tmp_path):
    repo = tmp_path / "hf" / "hub" / "models--local--tiny-llama"
    shutil.copytree(tiny_model, repo / "snapshots" / REVISION)
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text(REVISION)
    env = dict(script_env(1), HF_HOME=str(tmp_path / "hf"), HF_HUB_OFFLINE="1")
    output = tmp_path / "from-hub"
    proc = subprocess.run([sys.executable, str(ROOT / "save_sharded_state.py"), "--model", "local/tiny-llama",
                           "--output", str(output)], cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    manifest = read_manifest(output)
    assert manifest.source == "local/tiny-llama"
    assert {f.path for f in manifest.files} >= {"config.json", "tokenizer.json"}
    assert same_weights(output, checkpoints(1, 1))  # the local save's tokens: test_round_trip.py
