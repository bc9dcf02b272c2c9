"""The arrows point down: the two scripts use the package (and vLLM's public
API); the package's modules import one another without a cycle (imports
inside functions count), reach vLLM's internals only through vllm_compat.py,
which imports nothing of ours, and never run or import the scripts; importing
the package (vLLM does, in every engine process, through our plugin) imports
neither torch nor vLLM."""

import ast
import subprocess
import sys
from pathlib import Path

import pytest

from conftest import ROOT

PACKAGE = sorted((ROOT / "presharded").glob("*.py"))
SCRIPTS = ["save_sharded_state", "load_sharded_state"]


def imports(path: Path) -> set[str]:
    """Every module `path` imports, at its top or inside a function (`from presharded import x`: presharded.x)."""
    names = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            names |= {alias.name for alias in node.names}
        elif isinstance(node, ast.ImportFrom) and node.module:
            names.add(node.module)
            if node.module == "presharded":
                names |= {f"presharded.{alias.name}" for alias in node.names}
    return names


def ours(path: Path) -> set[str]:
    return {m.split(".")[1] for m in imports(path) if m.startswith("presharded.")} - {path.stem}


def test_no_import_cycle():
    graph = {p.stem: ours(p) for p in PACKAGE}
    done: set[str] = set()

    def visit(module: str, path: list[str]) -> None:
        assert module not in path, "an import cycle: " + " -> ".join([*path[path.index(module):], module])
        if module not in done:
            for dep in sorted(graph.get(module, ())):
                visit(dep, [*path, module])
            done.add(module)

    for module in sorted(graph):
        visit(module, [])


def test_vllm_compat_imports_nothing_of_ours():
    assert ours(ROOT / "presharded" / "vllm_compat.py") == set()


@pytest.mark.parametrize("path", PACKAGE, ids=lambda p: p.name)
def test_the_package_never_reaches_up_to_the_scripts(path):
    assert not imports(path) & {*SCRIPTS, "runpy"}
    names = {node.value for node in ast.walk(ast.parse(path.read_text()))
             if isinstance(node, ast.Constant) and isinstance(node.value, str)}
    spelled = {n for n in names for s in SCRIPTS if n in (s, f"{s}.py", f"{s}:main") or n.endswith(f"/{s}.py")}
    assert not spelled, f"a script run by its name or path: {spelled}"
    assert "__file__" not in path.read_text(), "a path beside the package: not there once it is installed"


@pytest.mark.parametrize("path", [*PACKAGE, *(ROOT / f"{s}.py" for s in SCRIPTS)], ids=lambda p: p.name)
def test_vllms_internals_only_in_vllm_compat(path):
    if path.name != "vllm_compat.py":
        assert not {m for m in imports(path) if m.startswith("vllm.")}


@pytest.mark.parametrize("script", SCRIPTS)
def test_the_scripts_use_the_package_and_vllm(script):
    used = imports(ROOT / f"{script}.py")
    assert {m for m in used if not m.startswith("presharded.")} <= {"os", "sys", "argparse", "vllm"}


def test_importing_the_package_is_light():
    code = ("import sys, presharded; names = [getattr(presharded, n) for n in presharded.__all__]; "
            "import presharded.plugin as p")
    # A warm restore takes seconds: its path (the load's checks, the restore) imports no numpy either (0.25 s there).
    restore = "import sys, presharded.load, presharded.snapshot_restore, presharded.prefetch"
    check = "; print(sorted(m for m in ('torch', 'vllm', 'numpy') if m in sys.modules))"
    light = subprocess.run([sys.executable, "-c", restore + check], cwd=ROOT, capture_output=True, text=True)
    assert light.stdout.strip() == "[]", light.stderr
    public = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True)
    assert public.returncode == 0, public.stderr[-2000:]


def test_the_readme_lists_every_module():
    readme = (ROOT / "README.md").read_text()
    table = readme[readme.index("## Layout"):]
    unlisted = [p.name for p in PACKAGE if p.name != "__init__.py" and f"{p.name}`" not in table]
    assert not unlisted, f"README's layout table misses {unlisted}"
    assert len(readme.splitlines()) <= 120


def test_the_snapshot_rpcs_name_the_workers_methods():
    from presharded import snapshot_inbox

    tree = ast.parse((ROOT / "presharded" / "snapshot_worker.py").read_text())
    worker, = [node for node in tree.body if isinstance(node, ast.ClassDef) and node.name == "SnapshotWorker"]
    methods = {node.name for node in worker.body if isinstance(node, ast.FunctionDef)}
    assert {snapshot_inbox.ASLEEP, snapshot_inbox.KEEP_WEIGHTS, snapshot_inbox.RESTORED, snapshot_inbox.REFILL} <= methods
