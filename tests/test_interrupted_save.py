"""A save interrupted for real (kill -9, Ctrl-C) leaves the old checkpoint as
it was and nothing that a load accepts; the next save cleans up."""

import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

from conftest import ROOT, refused, save, script_env, snapshot
from presharded.checks import check_checkpoint
from presharded.files import UNFINISHED_MARKER, staging_folder


def start_save(model: Path, output: Path, *flags: str) -> subprocess.Popen:
    return subprocess.Popen(
        [sys.executable, str(ROOT / "save_sharded_state.py"), "--model", str(model), "--output", str(output), *flags],
        cwd=ROOT, env=script_env(1), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
    )


def wait_until_writing(proc: subprocess.Popen, staging: Path, timeout: float = 120) -> None:
    """Until the worker has written a weight file into the staging folder."""
    deadline = time.monotonic() + timeout
    while not list(staging.glob("*.safetensors")):
        assert proc.poll() is None, proc.communicate()[1][-3000:]
        assert time.monotonic() < deadline, "the save never started writing"
        time.sleep(0.02)


def test_kill_9_mid_replace_keeps_the_old_checkpoint(tiny_model, checkpoints, tmp_path):
    output = shutil.copytree(checkpoints(1, 1), tmp_path / "ckpt")
    before = snapshot(output)
    staging = staging_folder(output)
    proc = start_save(tiny_model, output, "--replace", "--max-file-size", "100KB")
    wait_until_writing(proc, staging)
    proc.kill()
    proc.wait()

    assert snapshot(output) == before  # the old checkpoint, untouched and complete
    check_checkpoint(output, verify_hashes=True)
    assert (staging / UNFINISHED_MARKER).exists()  # what was left behind is marked unfinished
    line = refused("a staging folder left by kill -9", "load_sharded_state.py", "--model", str(staging))
    assert "is an unfinished save" in line

    save(tiny_model, output, "--replace")  # the next save cleans up
    assert not staging.exists()
    assert check_checkpoint(output, verify_hashes=True).tensor_parallel_size == 1


def test_ctrl_c_mid_save_leaves_nothing(tiny_model, tmp_path):
    output = tmp_path / "ckpt"
    proc = start_save(tiny_model, output, "--max-file-size", "100KB")
    wait_until_writing(proc, staging_folder(output))
    proc.send_signal(signal.SIGINT)
    _, stderr = proc.communicate(timeout=60)
    assert proc.returncode == 130, stderr[-3000:]
    assert stderr.strip().splitlines()[-1] == "interrupted"
    assert not output.exists()
    assert not staging_folder(output).exists()


DROPPED = """
import os, signal
from presharded.errors import exits_cleanly, raise_if_interrupted, remember_interrupts


class Drops:
    def __del__(self):
        os.kill(os.getpid(), signal.SIGINT)  # the KeyboardInterrupt comes out of __del__: Python ignores it


@exits_cleanly
def main():
    remember_interrupts()
    Drops()
    print("carried on", flush=True)
    raise_if_interrupted()  # what the save checks before it publishes


main()
"""


def test_a_ctrl_c_that_python_drops_is_not_lost():
    # Seen in CI: the Ctrl-C of the test above landed in a regex object's __del__
    # and the save went on to publish a checkpoint.
    proc = subprocess.run([sys.executable, "-c", DROPPED], cwd=ROOT, capture_output=True, text=True, timeout=60)
    assert proc.stdout == "carried on\n"
    assert "Exception ignored" in proc.stderr
    assert proc.returncode == 130 and proc.stderr.strip().splitlines()[-1] == "interrupted"
