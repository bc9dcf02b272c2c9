"""The nodes of one engine agree on what they run before any engine starts, over the link that
watches them (presharded/nodes.py): another checkpoint or another layout on one node ends every
node in one line; a node that never joins ends the driver's wait within JOIN."""

import shutil
import subprocess
import sys
import threading
import time

from conftest import ROOT, free_port, script_env
from presharded import nodes
from presharded.manifest import hash_file, read_manifest, write_manifest


def both(script: str, args: tuple[list[str], list[str]]) -> list[subprocess.CompletedProcess]:
    """Node 1 first, then node 0, each with its own arguments."""
    port = str(free_port())
    procs = [subprocess.Popen([sys.executable, str(ROOT / script), *args[node], "--nnodes", "2", "--node-rank",
                               str(node), "--master-addr", "127.0.0.1", "--master-port", port], cwd=ROOT,
                              env=script_env(2), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
             for node in (1, 0)]
    return [subprocess.CompletedProcess(p.args, p.wait(60), *p.communicate()) for p in reversed(procs)]


def refused_on_both(results: list[subprocess.CompletedProcess]) -> str:
    lines = [r.stderr.strip().splitlines() for r in results]
    assert [r.returncode for r in results] == [1, 1], results
    assert all(len(each) == 1 and each[0].startswith("error: ") for each in lines), lines
    assert lines[0] == lines[1]
    return lines[0][0]


def test_two_nodes_given_different_checkpoints_both_refuse(files_only, tmp_path):
    ours = files_only(2, 1)
    other = shutil.copytree(ours, tmp_path / "other")
    manifest = read_manifest(other)
    weights = other / manifest.shards[1].path
    data = bytearray(weights.read_bytes())
    data[-1] ^= 0xFF  # another checkpoint of the same shape
    weights.write_bytes(bytes(data))
    manifest.shards[1].blake3 = hash_file(weights)
    write_manifest(other, manifest)
    line = refused_on_both(both("load_sharded_state.py", (["--model", str(ours)], ["--model", str(other)])))
    assert f"node 1 of 2 runs checkpoint '{manifest.id}', node 0 '{read_manifest(ours).id}'" in line


def test_two_nodes_saving_at_different_sizes_both_refuse(tiny_model, tmp_path):
    flags = ["--model", str(tiny_model), "--output", str(tmp_path / "ckpt")]
    line = refused_on_both(both("save_sharded_state.py", ([*flags, "-tp", "2"], [*flags, "-tp", "4"])))
    assert "node 1 of 2 runs tensor_parallel_size 4, node 0 2" in line
    assert not (tmp_path / "ckpt").exists()


def test_a_node_that_never_joins_ends_the_drivers_wait(monkeypatch):
    """As when node 1 was refused before the driver listened: the driver stops waiting within JOIN."""
    monkeypatch.setattr(nodes, "JOIN", 1.0)
    lost: list[str] = []
    heard = threading.Event()
    start = time.monotonic()
    nodes.Liveness(nodes.Node(0, 2, "127.0.0.1", free_port()), "the load", lambda r: (lost.append(r), heard.set()))
    assert heard.wait(5), "the driver waited on"
    assert time.monotonic() - start < 3
    assert lost == ["node 1 of 2 did not join within 1 s; start it with the same --master-addr and --master-port"]
