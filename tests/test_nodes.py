"""Two nodes on one machine, as vLLM's multiprocessing executor runs one model
over several (--nnodes 2, --node-rank, --master-addr 127.0.0.1): each node
its own processes and, for node-local disks, its own folder bound to one
path in a mount namespace of its own (`unshare`)."""

import json
import os
import shutil
import signal
import subprocess
import sys
import time

from pathlib import Path

import psutil
import pytest
from safetensors import safe_open

from conftest import (PROMPT, REFUSALS, ROOT, cmdline, free_port, left_in_dev_shm, on_two_nodes, own_disks_possible,
                      refused, run_script, script_env)
from presharded.formats import FAST_FORMAT, SHARDED_STATE
from presharded.generate import greedy_tokens
from presharded.manifest import read_manifest
from presharded.tiny_models import build_tiny


def tokens(result: subprocess.CompletedProcess) -> list[int]:
    return json.loads(result.stdout)["token_ids"]


@pytest.fixture(scope="module")
def own_disks(tiny_model, tmp_path_factory):
    """The tiny model saved at TP=2 by two nodes, each onto a disk of its own."""
    if not own_disks_possible():
        pytest.skip("unshare -rm is not allowed here: no mount namespace to give each node a disk of its own")
    root = tmp_path_factory.mktemp("nodes")
    disks, mount = (root / "disk0", root / "disk1"), root / "mnt"
    for folder in (*disks, mount):
        folder.mkdir()
    saved = on_two_nodes("save_sharded_state.py", "--model", str(tiny_model), "--output", str(mount / "ckpt"),
                         "-tp", "2", disks=disks, mount=mount)
    assert saved[0].stdout.strip() == saved[1].stdout.strip() == str(mount / "ckpt")
    return disks, mount


def test_each_node_keeps_its_own_ranks(own_disks):
    disks, _ = own_disks
    manifests = [read_manifest(d / "ckpt") for d in disks]
    assert manifests[0] == manifests[1] and manifests[0].nodes == 2
    for node, disk in enumerate(disks):
        weights = sorted(p.name for p in (disk / "ckpt").glob("*.safetensors"))
        assert weights == [f"model-rank-{node}-part-0.safetensors"]
        assert {s.path: s.node for s in manifests[0].shards}[weights[0]] == node
        assert (disk / "ckpt" / "config.json").exists()
        assert not list(disk.glob(".ckpt.presharded-*"))


def test_load_across_nodes_with_own_disks(own_disks, reference_tokens):
    disks, mount = own_disks
    driver, other = on_two_nodes("load_sharded_state.py", "--model", str(mount / "ckpt"), "--prompt", PROMPT,
                                 "--max-tokens", "24", "--enforce-eager", "--json",
                                 "--load-format", "fast_sharded_state", disks=disks, mount=mount)
    assert tokens(driver) == reference_tokens(tp=2)
    assert other.stdout == ""


def test_a_node_without_its_files_is_refused(own_disks):
    disks, _ = own_disks
    line = refused("a node without its ranks' files", "load_sharded_state.py", "--model", str(disks[0] / "ckpt"),
                   "--nnodes", "2", "--node-rank", "1", world_size=2, engine_process=True)
    assert "model-rank-1-part-0.safetensors is missing on node 1 of 2, which runs rank pp=0 tp=1" in line
    line = refused("one node's folder loaded alone", "load_sharded_state.py", "--model", str(disks[1] / "ckpt"),
                   world_size=2)
    assert "2 nodes saved this checkpoint" in line and "node 0's" in line


def test_gathered_folders_are_one_checkpoint(own_disks, tmp_path):
    disks, _ = own_disks
    for node, disk in enumerate(disks):  # each node's folder is complete for its own ranks
        proc = run_script("presharded.verify_cli", str(disk / "ckpt"), "--node-rank", str(node))
        assert proc.returncode == 0 and "ok: 6 files" in proc.stdout, proc.stderr[-3000:]
    gathered = tmp_path / "ckpt"
    shutil.copytree(disks[0] / "ckpt", gathered)
    shutil.copy(disks[1] / "ckpt" / "model-rank-1-part-0.safetensors", gathered)
    proc = run_script("presharded.verify_cli", str(gathered), "--json")
    assert proc.returncode == 0, proc.stderr[-3000:]


@pytest.fixture(scope="module")
def moe_model(tmp_path_factory) -> Path:
    """DeepSeek-V2's shape: MLA, a dense first layer, then routed and shared experts (4 layers)."""
    return build_tiny(tmp_path_factory.mktemp("models") / "tiny-deepseek-v2", "deepseek-v2")


def test_shared_folder_pipeline_stages(moe_model, tmp_path):
    """PP=2, one stage per node, both writing into one folder (as on NFS): the driver gathers a
    complete checkpoint that one node loads at PP=2 (loads across nodes: above). The model is a
    mixture of experts with MLA, in pipeline stages, which vLLM's own sharded_state cannot save (PR
    52110): each stage holds its layers' experts in the layout vLLM loads them into, not the one its
    kernels repack them to after loading (PR 51496), and MLA's projections by vLLM's names and shapes;
    the files have vLLM's pipeline-stage names, the sizes come from the manifest."""
    output = tmp_path / "ckpt"
    on_two_nodes("save_sharded_state.py", "--model", str(moe_model), "--output", str(output), "-pp", "2")
    manifest = read_manifest(output)
    assert sorted(p.name for p in output.glob("*.safetensors")) == [
        "model-pp-0-tp-0-part-0.safetensors", "model-pp-1-tp-0-part-0.safetensors"]
    assert [s.node for s in manifest.shards] == [0, 1]
    assert not list(tmp_path.glob(".ckpt.presharded-*"))
    with safe_open(output / "model-pp-1-tp-0-part-0.safetensors", "pt") as last:  # layers 2 and 3, the head
        shapes = {name: last.get_slice(name).get_shape() for name in last.keys()}
    assert {name.split(".")[2] for name in shapes if name.startswith("model.layers.")} == {"2", "3"}
    layer = "model.layers.3"
    assert shapes[f"{layer}.mlp.experts.routed_experts.w13_weight"] == [8, 2 * 64, 128]  # experts, gate+up, hidden
    assert shapes[f"{layer}.mlp.experts.routed_experts.w2_weight"] == [8, 128, 64]
    assert shapes[f"{layer}.self_attn.fused_qkv_a_proj.weight"] == [64 + 512 + 64, 128]  # q_lora, kv_lora, rope
    assert shapes[f"{layer}.self_attn.kv_b_proj.weight"] == [4 * (128 + 128), 512]
    assert "lm_head.weight" in shapes and "model.embed_tokens.weight" not in shapes
    auto, sharded, fast = greedy_tokens([(moe_model, "auto"), (output, SHARDED_STATE), (output, FAST_FORMAT)],
                                        ["-pp", "2", "--max-tokens", "12"], [PROMPT], env=script_env(2), timeout=900)
    assert sharded["pipeline_parallel_size"] == fast["pipeline_parallel_size"] == 2
    assert sharded["token_ids"] == fast["token_ids"] == auto["token_ids"]
    assert len(set(auto["token_ids"][0])) > 1


def signal_while_starting(script: str, *args: str, node: int, sig: int) -> tuple[list[subprocess.CompletedProcess], float]:
    """Both nodes of one engine; once both run their vLLM workers (the engine is starting),
    `sig` to node `node`'s script. Returns both results (node 0, node 1) and the seconds from
    the signal to the other node's end; asserts that nothing either node started is left."""
    port = str(free_port())
    shared_before = set(os.listdir("/dev/shm"))
    procs = {}
    for n in (1, 0):
        cmd = [sys.executable, str(ROOT / script), *args, "--nnodes", "2", "--node-rank", str(n),
               "--master-addr", "127.0.0.1", "--master-port", port]
        procs[n] = subprocess.Popen(cmd, cwd=ROOT, env=script_env(2, engine_process=True), stdout=subprocess.PIPE,
                                    stderr=subprocess.PIPE, text=True)
    started: dict[int, psutil.Process] = {}
    deadline = time.monotonic() + 300
    while not all(any("Worker" in cmdline(p) for p in tree(procs[n])) for n in procs):
        ended = {n: p.communicate()[1][-3000:] for n, p in procs.items() if p.poll() is not None}
        assert time.monotonic() < deadline and not ended, f"no workers came; ended: {ended}"
        started.update((p.pid, p) for n in procs for p in tree(procs[n]))
        time.sleep(0.2)
    started.update((p.pid, p) for n in procs for p in tree(procs[n]))
    time.sleep(2)
    procs[node].send_signal(sig)
    signalled = time.monotonic()
    other = procs[1 - node].communicate(timeout=120)
    elapsed = time.monotonic() - signalled
    mine = procs[node].communicate(timeout=120)
    deadline = time.monotonic() + 10  # a guard ends what a killed script started, and removes what it left in /dev/shm
    while True:
        running = [cmdline(p) for p in started.values() if cmdline(p)]
        left = left_in_dev_shm(shared_before, wait=0)
        if not (running or left) or time.monotonic() > deadline:
            break
        time.sleep(0.2)
    assert not running, running
    assert not left, f"the nodes' engines left {left} in /dev/shm"
    outs = {node: mine, 1 - node: other}
    return [subprocess.CompletedProcess(procs[n].args, procs[n].returncode, *outs[n]) for n in (0, 1)], elapsed


def tree(proc: subprocess.Popen) -> list[psutil.Process]:
    try:
        return psutil.Process(proc.pid).children(recursive=True)
    except psutil.Error:
        return []


def ended_with_one_line(case: str, result: subprocess.CompletedProcess, *words: str) -> None:
    lines = result.stderr.strip().splitlines()
    assert result.returncode == 1 and lines[-1].startswith("error: "), result.stderr[-3000:]
    assert all(w in lines[-1] for w in words), lines[-1]
    assert "Traceback" not in result.stderr, result.stderr[-3000:]
    REFUSALS[case] = lines[-1]


def test_a_node_killed_during_a_save_ends_the_other(tiny_model, tmp_path):
    output = tmp_path / "ckpt"
    (driver, other), elapsed = signal_while_starting("save_sharded_state.py", "--model", str(tiny_model), "--output",
                                                     str(output), "-tp", "2", node=1, sig=signal.SIGKILL)
    ended_with_one_line("nodes: node 1 killed during a save (the driver's line)", driver,
                        "node 1 of 2 ended during the save")
    assert elapsed < 60 and not output.exists()
    assert not list(tmp_path.glob(".ckpt.presharded-staging-node0-*"))  # the killed node's stays, marked unfinished


def test_the_driver_killed_during_a_load_ends_the_other(checkpoints):
    (driver, other), elapsed = signal_while_starting("load_sharded_state.py", "--model", str(checkpoints(2, 1)),
                                                     "--prompt", PROMPT, "--max-tokens", "1000", "--enforce-eager",
                                                     node=0, sig=signal.SIGKILL)
    ended_with_one_line("nodes: the driver killed during a load (node 1's line)", other, "node 1 of 2",
                        "node 0, the driver", "ended before the load was complete")
    assert elapsed < 60


def test_ctrl_c_on_the_driver_during_a_save_ends_every_node(tiny_model, tmp_path):
    output = tmp_path / "ckpt"
    (driver, other), elapsed = signal_while_starting("save_sharded_state.py", "--model", str(tiny_model), "--output",
                                                     str(output), "-tp", "2", node=0, sig=signal.SIGINT)
    assert driver.returncode == 130 and driver.stderr.strip().splitlines()[-1] == "interrupted", driver.stderr[-3000:]
    ended_with_one_line("nodes: Ctrl-C on the driver during a save (node 1's line)", other, "node 0, the driver",
                        "ended before the save was complete")
    assert elapsed < 60 and not output.exists() and not list(tmp_path.glob(".ckpt.presharded-*"))
