"""presharded-bench on the tiny model: it says how to save the checkpoint it
measures, then starts vLLM once per load format (loader options included)
in fresh processes, and reports every phase, with the same first token from
every format."""

import json
import os
import shlex
import subprocess
import sys
from pathlib import Path

import pytest

from conftest import ROOT, script_env
from presharded.bench import ratios, resident_pages, starts


@pytest.fixture(scope="module")
def work(tmp_path_factory):
    """The bench's work folder, kept between the two runs below: the second finds the tiny model saved."""
    return tmp_path_factory.mktemp("bench-work")


def test_bench_says_how_to_save_then_runs_each_format_and_reports_phases(tmp_path, work):
    formats = ["sharded_state", "fast_sharded_state:chunk_mib=1:threads=2"]  # the loader's own options too
    bench = [sys.executable, "-m", "presharded.bench", "--synthetic", "tiny", "--tp", "1", "--repeats", "1",
             "--no-cold", "--no-throwaway", "--formats", ",".join(formats), "--max-tokens", "4",
             "--work", str(work), "--out", str(tmp_path / "out"), "--enforce-eager"]
    proc = subprocess.run(bench, cwd=ROOT, env=script_env(1), capture_output=True, text=True, timeout=600)
    assert proc.returncode == 1 and proc.stderr.splitlines()[-1].startswith("error: no checkpoint at "), proc.stderr[-3000:]
    save = shlex.split(proc.stderr.split("`")[1])  # the user's next command, as the bench wrote it
    assert save[0] == "presharded-save" and save[-1] == "--enforce-eager", save
    saved = subprocess.run([str(Path(sys.executable).parent / save[0]), *save[1:], "--json"], cwd=ROOT,
                           env=script_env(1), capture_output=True, text=True, timeout=600)
    assert saved.returncode == 0, saved.stderr[-3000:]
    written = json.loads(saved.stdout)  # the save's own report: how fast each rank wrote
    assert [(r["tp_rank"], r["bytes"]) for r in written["ranks"]] == [(0, written["bytes"])]
    assert written["write_gbps"] > 0 and written["ranks"][0]["write_gbps"] > 0
    proc = subprocess.run(bench, cwd=ROOT, env=script_env(1), capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    report = json.loads((tmp_path / "out" / "bench.json").read_text())
    assert [r["format"] for r in report["runs"]] == formats
    assert len({tuple(r["token_ids"]) for r in report["runs"]}) == 1 and len(report["runs"][0]["token_ids"]) == 4
    assert report["ratios"] == ["TP=1: 4 greedy tokens identical in every start that read the weights"]
    for r in report["runs"]:  # the tiny model's weights may take under 5 ms: "0.00 seconds"
        assert r["weights"] >= 0 and r["model_init"] > 0 and r["profile_kv_warmup"] > 0, r
        assert r["import"] > 0 and r["total"] >= r["engine"] > 0, r
        assert r["process"] > r["total"], r  # the whole process, timed from outside, holds the script's own total
    assert [len(r["loads"]) for r in report["runs"]] == [0, 1]
    load = report["runs"][1]["loads"][0]
    assert (load["threads"], load["chunk_mib"], load["pp_rank"], load["tp_rank"]) == (2, 1, 0, 0)
    assert load["bytes"] > 0 and load["seconds"] == report["runs"][1]["weights"]
    assert [row["format"] for row in report["summary"]] == formats
    assert "| 1 | fast_sharded_state:chunk_mib=1:threads=2 | warm | 1 |" in proc.stdout


def test_bench_names_the_engines_root_cause_when_a_start_fails(tmp_path, work):
    proc = subprocess.run(
        [sys.executable, "-m", "presharded.bench", "--synthetic", "tiny", "--repeats", "1", "--no-cold",
         "--no-throwaway", "--formats", "fast_sharded_state:bogus=1",
         "--work", str(work), "--out", str(tmp_path / "out"), "--enforce-eager"],
        cwd=ROOT, env=script_env(1), capture_output=True, text=True, timeout=600)
    assert proc.returncode != 0
    head = proc.stderr.split("failed:\n", 1)[1][:2000]  # before the front end's traceback
    assert "unknown model_loader_extra_config keys for fast_sharded_state: ['bogus']" in head, proc.stderr[-3000:]


def test_bench_formats_take_turns():
    assert starts(["dummy", "a", "b:x=1"], 2, cold=True) == [
        ("cold", 0, "a"), ("cold", 0, "b:x=1"), ("cold", 1, "a"), ("cold", 1, "b:x=1"),
        ("warm", 0, "dummy"), ("warm", 0, "a"), ("warm", 0, "b:x=1"), ("warm", 1, "a"), ("warm", 1, "b:x=1")]
    assert starts(["dummy", "a"], 1, cold=True, warm=False) == [("cold", 0, "a")]


def test_pages_in_the_page_cache_are_counted(tmp_path):
    """What --fresh checks before a new node's start: none of the files' pages left in the page cache."""
    path = tmp_path / "weights"
    path.write_bytes(os.urandom(8 * 2**20))
    path.read_bytes()
    resident, total = resident_pages([path])
    assert total == 8 * 2**20 // os.sysconf("SC_PAGE_SIZE") and resident == total
    fd = os.open(path, os.O_RDONLY)
    os.fsync(fd)
    os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
    os.close(fd)
    assert resident_pages([path]) == (0, total)


def test_each_restored_new_node_is_compared_with_the_cat_right_before_it():
    runs = [{"tp": 1, "format": "snapshot", "cache": "fresh", "repeat": i, "process": p, "floor": f}
            for i, (p, f) in enumerate([(10.0, 9.0), (9.9, 9.0)])]
    runs.append({"tp": 1, "format": "snapshot", "cache": "warm", "repeat": 0, "process": 2.5, "floor": None})
    rows = [{"tp": 1, "format": "snapshot", "cache": "fresh", "process": 9.95},
            {"tp": 1, "format": "snapshot", "cache": "warm", "process": 2.5}]
    assert ratios(rows, runs) == [
        "TP=1: new node snapshot, run 1: 10.00 s / cat of its image and weights 9.00 s = 1.11",
        "TP=1: new node snapshot, run 2: 9.90 s / cat of its image and weights 9.00 s = 1.10"]
