"""A checkpoint is untrusted input: a manifest edited by someone else, written
as an attacker would write it, is refused in one line by every reader (the
load script, verify, inspect, presharded-caches), before anything is read
through it or vLLM is imported; and by the fast loader under vLLM's server,
where no script checked first (tests/test_fast_loader.py). Bounded time, no
traceback."""

import json
import os
import shutil
from pathlib import Path

import pytest

from conftest import link_weight_out, outside, refused, run_script
from presharded.manifest import MANIFEST_NAME, leads_out

READERS = {
    "load": ("load_sharded_state.py", "--model"),
    "verify": ("presharded.verify_cli",),
    "inspect": ("presharded.inspect_cli",),
    "caches": ("presharded.caches_cli", "--env"),
}
SET = "start-caches/S"


def edit(folder: Path, change) -> None:
    path = folder / MANIFEST_NAME
    raw = json.loads(path.read_text())
    change(raw)
    path.write_text(json.dumps(raw))


def set_path(raw: dict, path: str) -> None:
    raw["caches"]["S"][0]["path"] = path


def link_set_out(folder: Path) -> None:
    target = outside(folder) / "S"
    shutil.move(folder / SET, target)
    (folder / SET).symlink_to(target, target_is_directory=True)


def fifo_manifest(folder: Path) -> None:
    (folder / MANIFEST_NAME).unlink()
    os.mkfifo(folder / MANIFEST_NAME)


def huge_manifest(folder: Path) -> None:
    with open(folder / MANIFEST_NAME, "ab") as f:
        f.write(b" " * (64 * 2**20))


def pattern_out(raw: dict) -> None:
    raw["file_pattern"] = "../{rank}-{part}.safetensors"
    for s in raw["shards"]:
        s["path"] = f"../{s['tp_rank']}-{s['part']}.safetensors"


# case: (what it does to the checkpoint, a piece of the refusal)
CASES = {
    "a weight path that is absolute": (
        lambda f: edit(f, lambda r: r["shards"][0].update(path=str(outside(f) / "model-rank-0-part-0.safetensors"))),
        "is not the file_pattern's name"),
    "a weight path that climbs out": (
        lambda f: edit(f, lambda r: r["shards"][0].update(path="../x/model-rank-0-part-0.safetensors")),
        "is not the file_pattern's name"),
    "a weight file that is a symlink out": (link_weight_out, "leads out of the checkpoint"),
    "a file pattern that climbs out": (lambda f: edit(f, pattern_out), "must name a plain file"),
    "a copied file /etc/passwd": (
        lambda f: edit(f, lambda r: r["files"].append({"path": "/etc/passwd", "size": 1, "blake3": "0" * 64})),
        "is not a plain relative path"),
    "a copied file that is a weight file": (
        lambda f: edit(f, lambda r: r["files"].append({"path": "model-rank-0-part-1.safetensors", "size": 1,
                                                       "blake3": "0" * 64})),
        "is a weight file"),
    "a start-up cache path that climbs out": (
        lambda f: edit(f, lambda r: set_path(r, f"{SET}/inductor/../../../../escaped.py")),
        "is not a plain relative path"),
    "an absolute start-up cache path": (
        lambda f: edit(f, lambda r: set_path(r, "/tmp/escaped.py")), "is not under start-caches/S/"),
    "a start-up cache file beside the caches": (
        lambda f: edit(f, lambda r: set_path(r, f"{SET}/model/x")), "is not under start-caches/S/"),
    "a start-up cache folder that is a symlink out": (link_set_out, "leads out of the checkpoint"),
    "a start-up cache set named with a path": (
        lambda f: edit(f, lambda r: r["caches"].update({"../S": r["caches"].pop("S")})), "not a plain folder name"),
    "tensor_parallel_size 10**30": (
        lambda f: edit(f, lambda r: r.update(tensor_parallel_size=10**30)), "do not fit its 2 weight files"),
    "tensor_parallel_size 0": (
        lambda f: edit(f, lambda r: r.update(tensor_parallel_size=0)), "do not fit its 2 weight files"),
    "a rank that is a string": (
        lambda f: edit(f, lambda r: r["shards"][1].update(tp_rank="1")), "'tp_rank' in a weight file's entry is str"),
    "a size that is true": (
        lambda f: edit(f, lambda r: r["shards"][0].update(size=True)), "'size' in a weight file's entry is bool"),
    "shards that are an object": (
        lambda f: edit(f, lambda r: r.update(shards={})), "'shards' in the manifest is dict, not list"),
    "a weight entry that is a list": (
        lambda f: edit(f, lambda r: r["shards"].__setitem__(0, [1, 2])), "a weight file's entry is not a JSON object"),
    "a rank outside the layout": (
        lambda f: edit(f, lambda r: r["shards"][1].update(tp_rank=7)), "outside the layout"),
    "a rank's parts 0 and 2": (
        lambda f: edit(f, lambda r: r["shards"][1].update(tp_rank=0, part=2, path="model-rank-0-part-2.safetensors")),
        "has parts [0, 2]"),
    "nodes 0": (lambda f: edit(f, lambda r: r.update(nodes=0)), "nodes 0 is not between 1 and the 2 ranks"),
    "an unknown field": (lambda f: edit(f, lambda r: r.update(run="rm -rf /")), "unknown fields ['run']"),
    "a manifest nested 100000 deep": (
        lambda f: (f / MANIFEST_NAME).write_text('{"format": "presharded", "format_version": 3, "x": '
                                                 + "[" * 100000 + "]" * 100000 + "}"), "nested too deeply"),
    "a path that is a file and a folder": (
        lambda f: edit(f, lambda r: r["files"].extend([{"path": "x", "size": 0, "blake3": "0" * 64},
                                                       {"path": "x/y", "size": 0, "blake3": "0" * 64}])),
        "'x' is listed as a file and is the folder of another file"),
    "100000 empty files": (
        lambda f: edit(f, lambda r: r["files"].extend({"path": f"e{i}", "size": 0, "blake3": "0" * 64}
                                                      for i in range(100_000))), "more than the 50000"),
    "a manifest that is a named pipe": (fifo_manifest, "not a plain file"),
    "a manifest of 64 MiB": (huge_manifest, "larger than 64 MiB"),
}


@pytest.mark.parametrize("reader", READERS)
@pytest.mark.parametrize("case", CASES)
def test_every_reader_refuses(files_only, tmp_path, case, reader):
    ckpt = shutil.copytree(files_only(), tmp_path / "ckpt", symlinks=True)
    change, expected = CASES[case]
    change(ckpt)
    line = refused(f"manifest: {case}" if reader == "load" else None, *READERS[reader], str(ckpt))
    assert expected in line, line
    assert not (tmp_path / "escaped.py").exists() and not Path("/tmp/escaped.py").exists()


def test_verify_checks_the_start_up_caches(files_only, tmp_path):
    ckpt = shutil.copytree(files_only(), tmp_path / "ckpt")
    proc = run_script("presharded.verify_cli", str(ckpt))
    assert proc.returncode == 0 and "(1 of them start-up caches, 0 engine snapshots)" in proc.stdout, proc.stderr
    cached = ckpt / SET / "inductor" / "kernel.py"
    cached.write_text(cached.read_text().replace("compiled", "replaced"))  # same size, other bytes
    line = refused("a start-up cache file changed (verify)", "presharded.verify_cli", str(ckpt))
    assert f"{cached} does not match its hash" in line


def test_a_path_leads_out_through_any_link_on_its_way(tmp_path):
    """Each name on a listed path is looked at once (presharded/manifest.py's leads_out): a link anywhere
    on the way counts, as when the whole path was resolved."""
    folder, away = tmp_path / "ckpt", tmp_path / "away"
    (folder / "d" / "e").mkdir(parents=True)
    away.mkdir()
    (folder / "d" / "f").write_text("x")
    (folder / "in").symlink_to("d", target_is_directory=True)
    (folder / "out").symlink_to(away, target_is_directory=True)
    (folder / "d" / "to-out").symlink_to("../out")  # a link inside, to a link out
    (folder / "loop").symlink_to("loop")
    assert leads_out(folder, ["d/f", "in/f", "in/e/missing", "d/e"]) is None
    for path in ("out/f", "d/to-out", "d/to-out/f", "in/to-out/f", "loop", "loop/f"):
        assert leads_out(folder, ["d/f", path]) == path, path
