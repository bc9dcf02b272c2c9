"""Lab probe for the engine snapshot (issue 25), one GPU, vLLM 0.26, TP=1,
in-process engine: start from a checkpoint with the fast loader and sleep
mode, generate, sleep at level 2 (weights and KV cache freed), CUDA
checkpoint, CRIU dump (in a PID namespace of its own with --pidns), drop the
page cache, CRIU restore, CUDA restore, wake, refill the weights with our
loader from the checkpoint's files, generate again. It prints one JSON
object: the tokens before and after, the image's size and every phase.

On the GPU machine, after ../shared/gpu/README.md's install, carrying
.whl/criu (CRIU 4.2.1 from stage-criu.sh, and NVIDIA's cuda-checkpoint):
    echo 2 > /proc/sys/kernel/io_uring_disabled
    export PYTHONPATH=/root/site:. VLLM_USE_FLASHINFER_SAMPLER=0 PYTHONUNBUFFERED=1
    python3 dev/snapshot_probe.py CKPT --work /root/snap [--pidns] [engine flags] > probe.json
"""

import argparse
import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

PROMPT = "The capital of France is"
TOOLS = Path(os.environ.get("SNAPSHOT_TOOLS", ".whl/criu")).resolve()  # criu, lib/, cuda-checkpoint
CRIU_FLAGS = ["--shell-job", "--tcp-established", "--network-lock", "skip", "--ext-unix-sk", "--file-locks"]


def criu(*args: str) -> float:
    start = time.perf_counter()
    env = {**os.environ, "LD_LIBRARY_PATH": str(TOOLS / "lib")}
    subprocess.run([str(TOOLS / "criu"), *args], check=True, env=env)
    return time.perf_counter() - start


def cuda_toggle(pid: int) -> float:
    start = time.perf_counter()
    subprocess.run([str(TOOLS / "cuda-checkpoint"), "--toggle", "--pid", str(pid)], check=True)
    return time.perf_counter() - start


def drop_page_cache() -> None:
    subprocess.run(["sync"], check=True)
    Path("/proc/sys/vm/drop_caches").write_text("3\n")


def wait_for(path: Path, timeout: float, proc: subprocess.Popen | None = None) -> dict:
    deadline = time.monotonic() + timeout
    while not path.exists():
        if proc is not None and proc.poll() is not None:
            raise SystemExit(f"error: the engine ended ({proc.returncode}) before {path.name}")
        if time.monotonic() > deadline:
            raise SystemExit(f"error: no {path.name} within {timeout:.0f} s")
        time.sleep(0.005)
    return json.loads(path.read_text())


def put(path: Path, data: dict) -> None:
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps(data))
    tmp.rename(path)


def refill(worker) -> float:
    """In the worker, after wake_up: our loader reads the rank's files into the woken weights."""
    import torch

    from presharded.fast_loader import FastShardedStateLoader

    runner = worker.model_runner
    start = time.perf_counter()
    FastShardedStateLoader(worker.vllm_config.load_config).load_weights(runner.get_model(), runner.model_config)
    torch.cuda.synchronize()
    return time.perf_counter() - start


def engine(args: argparse.Namespace, extra: list[str]) -> None:
    """The process that is snapshotted."""
    import torch
    from vllm import LLM, EngineArgs, SamplingParams
    from presharded.vllm_compat import FlexibleArgumentParser

    parser = EngineArgs.add_cli_args(FlexibleArgumentParser())
    engine_args = EngineArgs.from_cli_args(parser.parse_args(["--model", str(args.checkpoint), *extra]))
    engine_args.load_format, engine_args.enable_sleep_mode = "fast_sharded_state", True
    work = args.work
    if os.getpid() == 1:  # init of its own PID namespace: its session too, or CRIU refuses (a leader outside)
        os.setsid()
    t0 = time.perf_counter()
    llm = LLM.from_engine_args(engine_args)
    greedy = SamplingParams(temperature=0, max_tokens=32)
    tokens = list(llm.generate([PROMPT], greedy)[0].outputs[0].token_ids)
    started = time.perf_counter() - t0
    t1 = time.perf_counter()
    llm.sleep(level=2)
    torch.cuda.empty_cache()
    free, total = torch.cuda.mem_get_info()
    slept = time.perf_counter() - t1
    null = os.open(os.devnull, os.O_RDWR)  # nothing of this machine's log files goes into the image
    for fd in (0, 1, 2):
        os.dup2(null, fd)
    put(work / "ready.json", {"tokens": tokens, "start_s": started, "sleep_s": slept,
                              "gpu_used_asleep_gib": (total - free) / 2**30, "pid_inside": os.getpid()})
    request = wait_for(work / "request.json", timeout=10**9)  # the restored process goes on from here
    log = os.open(request["log"], os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o644)
    os.dup2(log, 1)
    os.dup2(log, 2)
    t2 = time.perf_counter()
    llm.wake_up()
    woke = time.perf_counter() - t2
    refill_s = llm.collective_rpc(refill)[0]
    t3 = time.perf_counter()
    after = list(llm.generate([PROMPT], greedy)[0].outputs[0].token_ids)
    put(work / "done.json", {"tokens": after, "wake_s": woke, "refill_s": refill_s,
                             "generate_s": time.perf_counter() - t3, "since_request_s": time.perf_counter() - t2})
    os._exit(0)


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("checkpoint", type=Path)
    parser.add_argument("--work", type=Path, required=True)
    parser.add_argument("--pidns", action="store_true", help="the engine as init of a PID namespace of its own")
    parser.add_argument("--prefetch", action="store_true", help="read the weights into the page cache during the restore")
    parser.add_argument("--cold", action="store_true", help="drop the page cache before the normal start too")
    parser.add_argument("--engine", action="store_true", help=argparse.SUPPRESS)
    args, extra = parser.parse_known_args()
    if args.engine:
        return engine(args, extra)

    work, images = args.work, args.work / "image"
    shutil.rmtree(work, ignore_errors=True)
    images.mkdir(parents=True)
    env = {**os.environ, "VLLM_ENABLE_V1_MULTIPROCESSING": "0", "VLLM_ALLOW_INSECURE_SERIALIZATION": "1"}
    command = [sys.executable, __file__, str(args.checkpoint.resolve()), "--work", str(work.resolve()), "--engine",
               *extra]
    if args.pidns:
        command = ["unshare", "--pid", "--fork", "--mount-proc", *command]  # CUDA fails without its own /proc
    report: dict = {"pidns": args.pidns, "cold": args.cold, "prefetch": args.prefetch, "engine_flags": extra}
    mounts = ["--ext-mount-map", "auto", "--enable-external-sharing", "--enable-external-masters"] if args.pidns else []
    if args.cold:
        drop_page_cache()
    with open(work / "engine.log", "w") as log:
        proc = subprocess.Popen(command, env=env, stdin=subprocess.DEVNULL, stdout=log, stderr=log,
                                start_new_session=True, cwd="/")
    report["before"] = wait_for(work / "ready.json", timeout=500, proc=proc)
    target = proc.pid
    if args.pidns:
        import psutil

        target = psutil.Process(proc.pid).children()[0].pid
    report["cuda_checkpoint_s"] = cuda_toggle(target)
    report["dump_s"] = criu("dump", "-t", str(target), "-D", str(images), *CRIU_FLAGS, *mounts, "-v2", "-o", "dump.log")
    proc.wait(timeout=60)
    report["image_gib"] = sum(p.stat().st_size for p in images.iterdir()) / 2**30
    drop_page_cache()

    t0 = time.perf_counter()
    if args.prefetch:  # the disk reads the weights while CRIU reads the image
        subprocess.Popen(["cat", *map(str, sorted(args.checkpoint.glob("*.safetensors")))], stdout=subprocess.DEVNULL)
    report["restore_s"] = criu("restore", "-D", str(images), *CRIU_FLAGS, *mounts, "-d", "--pidfile",
                               str(work / "restored.pid"), "-v2", "-o", "restore.log")
    restored = int((work / "restored.pid").read_text())
    report["cuda_restore_s"] = cuda_toggle(restored)
    put(work / "request.json", {"log": str(work / "restored.log")})
    report["after"] = wait_for(work / "done.json", timeout=300)
    report["restore_to_tokens_s"] = time.perf_counter() - t0
    report["same_tokens"] = report["before"]["tokens"] == report["after"]["tokens"]
    print(json.dumps(report, indent=1))


if __name__ == "__main__":
    main()
