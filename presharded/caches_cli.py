"""Add start-up caches to a checkpoint: start vLLM once on it with the engine
flags given (compilation and CUDA graphs on unless told otherwise) and keep
what that start compiled inside the checkpoint, as the set for this kind of
machine and the checkpoint's layout. Later starts of the checkpoint with the
same flags, on a machine of the same kind, use it (load_sharded_state.py
reports `caches: hit`). save_sharded_state.py does this by itself on GPUs.

    presharded-caches /models/llama-70b-tp8 [--max-model-len 8192 ...]

A set grows: each run adds what its start compiled. vLLM's server compiles
for other defaults than the load script (fewer batched tokens): `--serve`
starts the server instead. `--env` then puts the matching set in place and
prints the shell lines that point vLLM at it (the model as $PRESHARDED_MODEL):

    presharded-caches --serve /models/llama-70b-tp8 -tp 8
    eval "$(presharded-caches --env /models/llama-70b-tp8)"
    vllm serve "$PRESHARDED_MODEL" --served-model-name llama-70b --load-format fast_sharded_state ...
"""

import argparse
import json
import os
import shlex
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

from presharded.errors import UserError, exits_cleanly
from presharded.load_checks import check_checkpoint
from presharded.formats import FAST_FORMAT
from presharded.manifest import Manifest, write_manifest
from presharded.trust import TRUST_ENV, TRUST_FLAG, record

ROOT = Path(__file__).resolve().parent.parent


def add_caches(checkpoint: Path, engine_flags: list[str], serve: bool = False, trust: bool = False) -> str:
    """Start vLLM on `checkpoint` (the load script, or with `serve` vLLM's
    server) and keep what it compiled, with the set it started from if that
    may run, as the set for this machine; records that this user made it. Its name."""
    from presharded import start_caches

    manifest = check_checkpoint(checkpoint, require_manifest=True)
    name = start_caches.set_name(manifest.tensor_parallel_size, manifest.pipeline_parallel_size)
    with start_caches.workspace_locked(manifest) as workspace:  # loads of this checkpoint here wait for it
        start_caches.empty_workspace(workspace, checkpoint)
        if name in manifest.caches and start_caches.trusted(checkpoint, name, manifest.caches[name], trust,
                                                            "it is replaced by what this start compiles"):
            start_caches.put_in_place(workspace, checkpoint, name, manifest.caches[name])  # a set grows
        env = {**os.environ, **start_caches.engine_env(workspace)}
        what = "vLLM's server" if serve else "vLLM"
        print(f"starting {what} on {checkpoint} to fill the start-up caches {name}", file=sys.stderr, flush=True)
        if serve:
            start_server(workspace / "model", [*checkpoint_flags(manifest), *engine_flags], env)
        else:
            start_once(workspace / "model", engine_flags, env)
        manifest.caches[name] = start_caches.keep(workspace, checkpoint, manifest, name)
    write_manifest(checkpoint, manifest)
    try:
        record(name, manifest.caches[name], checkpoint)
    except UserError as e:
        print(f"warning: {e}; this set will need {TRUST_FLAG} to be used", file=sys.stderr)
    return name


def start_once(model: Path, engine_flags: list[str], env: dict[str, str]) -> None:
    cmd = [sys.executable, str(ROOT / "load_sharded_state.py"), "--model", str(model), "--max-tokens", "8",
           "--no-start-caches", *engine_flags]  # a few tokens: the first decode step may compile too
    proc = subprocess.run(cmd, env=env, stdout=subprocess.DEVNULL)
    if proc.returncode != 0:
        raise UserError(f"vLLM did not start on {model.resolve()} (exit {proc.returncode}; its messages are above); "
                        "no start-up caches were added")


def checkpoint_flags(manifest: Manifest) -> list[str]:
    """What the load script takes from the checkpoint by itself, for vLLM's server."""
    layout = manifest.engine_defaults()
    flags = ["--load-format", FAST_FORMAT, "--tensor-parallel-size", str(layout["tensor_parallel_size"]),
             "--pipeline-parallel-size", str(layout["pipeline_parallel_size"]), "--dtype", layout["dtype"]]
    if layout["enable_expert_parallel"]:
        flags.append("--enable-expert-parallel")
    if layout["quantization"]:
        flags += ["--quantization", layout["quantization"]]
    if "model_loader_extra_config" in layout:
        flags += ["--model-loader-extra-config", json.dumps(layout["model_loader_extra_config"])]
    return flags


def start_server(model: Path, engine_flags: list[str], env: dict[str, str]) -> None:
    """vLLM's OpenAI server on `model` until it answers one request: its defaults differ from the
    load script's (fewer batched tokens), and so does what it compiles."""
    from presharded.vllm_compat import is_cpu

    if is_cpu():
        env = {"VLLM_CPU_KVCACHE_SPACE": "1", **env}  # GiB; else 90 % of RAM
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    cmd = [sys.executable, "-m", "vllm.entrypoints.openai.api_server", "--model", str(model), *engine_flags,
           "--host", "127.0.0.1", "--port", str(port)]
    server = subprocess.Popen(cmd, env=env, stdout=subprocess.DEVNULL)
    try:
        if not serving(server, port):
            raise UserError(f"vLLM's server did not start on {model.resolve()} (exit {server.returncode}; "
                            "its messages are above); no start-up caches were added")
        completion(port, {"model": str(model), "prompt": "Hello", "max_tokens": 8})
    finally:
        stop(server)


def after_save(checkpoint: Path, save_argv: list[str]) -> str | None:
    """The save's last step: a set made with the engine flags the save was
    given (its own flags left out); a failure is a warning, the checkpoint is
    complete without caches."""
    try:
        return add_caches(checkpoint, serving_flags(save_argv))
    except UserError as e:
        print(f"warning: {e}; the checkpoint is complete without them (add them with presharded-caches)",
              file=sys.stderr)
        return None


def serving(server: subprocess.Popen, port: int, timeout: float = 3600) -> bool:
    """Wait until vLLM's server answers on `port` (True), or has exited or taken longer than `timeout` (False)."""
    deadline = time.monotonic() + timeout
    while server.poll() is None and time.monotonic() < deadline:
        try:
            urllib.request.urlopen(f"http://127.0.0.1:{port}/health", timeout=2)
            return True
        except OSError:
            time.sleep(1)
    return False


def completion(port: int, body: dict, timeout: float = 600) -> dict:
    request = urllib.request.Request(f"http://127.0.0.1:{port}/v1/completions", json.dumps(body).encode(),
                                     {"Content-Type": "application/json"})
    return json.load(urllib.request.urlopen(request, timeout=timeout))


def stop(server: subprocess.Popen, timeout: float = 60) -> None:
    server.terminate()
    try:
        server.wait(timeout=timeout)
    except subprocess.TimeoutExpired:
        server.kill()


def serving_env(checkpoint: Path, trust: bool = False) -> str:
    """`export` lines for a server started on $PRESHARDED_MODEL: the checkpoint
    through its caches' fixed place, or the checkpoint itself (with a warning) without a set."""
    from presharded import start_caches

    manifest = check_checkpoint(checkpoint, require_manifest=True)
    use = start_caches.prepare(checkpoint, manifest, manifest.tensor_parallel_size, manifest.pipeline_parallel_size,
                               trust)
    env = {**use.env, "PRESHARDED_MODEL": str(use.model.absolute())}
    return "\n".join(f"export {name}={shlex.quote(value)}" for name, value in env.items())


def serving_flags(save_argv: list[str]) -> list[str]:
    """The save's command line less what the load takes from the checkpoint or does not know."""
    parser = argparse.ArgumentParser(add_help=False, allow_abbrev=False)
    for flag in ["--model", "--output", "--max-file-size", "--file-pattern", "--load-format", "--revision",
                 "--tensor-parallel-size", "-tp", "--pipeline-parallel-size", "-pp"]:
        parser.add_argument(flag)
    for flag in ["--replace", "--json", "--start-caches", "--no-start-caches"]:
        parser.add_argument(flag, action="store_true")
    return parser.parse_known_args(save_argv)[1]


@exits_cleanly
def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("checkpoint", type=Path)
    parser.add_argument("--serve", action="store_true",
                        help="start vLLM's OpenAI server (what `vllm serve` compiles) instead of the load script")
    parser.add_argument("--env", action="store_true",
                        help="add nothing: put the matching set in place and print the shell lines to serve from it")
    parser.add_argument(TRUST_FLAG, dest="trust", action="store_true",
                        help=f"use the checkpoint's set though this user did not make it here (or {TRUST_ENV}=1): "
                        "it holds compiled code that will run")
    args, engine_flags = parser.parse_known_args()
    if args.env:
        print(serving_env(args.checkpoint, args.trust))
        return
    name = add_caches(args.checkpoint, engine_flags, serve=args.serve, trust=args.trust)
    entries = check_checkpoint(args.checkpoint, require_manifest=True).caches[name]
    size = sum(e.size for e in entries)
    print(f"{args.checkpoint}: start-up caches {name} ({len(entries)} files, {size / 1e6:.1f} MB)")


if __name__ == "__main__":
    main()
