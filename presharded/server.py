"""vLLM's OpenAI-compatible server as a child process on loopback: what
presharded-caches --serve starts to compile what the server compiles, and
what the tests start to serve a checkpoint."""

import json
import socket
import subprocess
import sys
import time
import urllib.request
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path


VLLM = ("-m", "vllm.entrypoints.openai.api_server", "--model")
SERVE = ("-m", "presharded.serve_cli")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@contextmanager
def running(model: Path, flags: list[str], env: dict[str, str], timeout: float = 3600,
            stderr=None, entry: tuple[str, ...] = VLLM) -> Iterator[tuple[subprocess.Popen, int | None]]:
    """vLLM's server on `model` (or `entry`'s, presharded-serve's): (the process, its port once it answers;
    None if it ended or took longer than `timeout`). Stopped when the block ends."""
    port = free_port()
    cmd = [sys.executable, *entry, str(model), *flags, "--host", "127.0.0.1", "--port", str(port)]
    server = subprocess.Popen(cmd, env=env, stdout=subprocess.DEVNULL, stderr=stderr, text=True)
    try:
        yield server, port if serving(server, port, timeout) else None
    finally:
        stop(server)


def serving(server: subprocess.Popen, port: int, timeout: float) -> bool:
    """Wait until the server answers on `port` (True), or has exited or taken longer than `timeout` (False)."""
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
        server.wait()
