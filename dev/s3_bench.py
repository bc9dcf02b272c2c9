"""Issue 26's numbers: our S3 load and upload against the library's own, and
the same file from the local disk, in one run, against moto's S3 server on
127.0.0.1 (a real HTTP server; it may be what limits every S3 figure here).

A checkpoint of one rank is made without vLLM (one safetensors file of
--mib MiB of bf16 tensors and its manifest). Then, the clients taking turns:
- upload: ours (presharded.s3.upload: every file, then the manifest with
  ETags) and boto3's upload_file with its default settings;
- read: ours (presharded.reader.load_files over S3 objects, ranged GETs with
  If-Match into the staging buffers, copied into tensors) and plain parallel
  ranged GETs of the same object with boto3 into one buffer (--threads at
  once, --chunk-mib each);
- the same file from the local disk with our reader, warm and cold.
Prints one JSON object with GB/s and the ratios the issue sets targets for.

    python dev/s3_bench.py --mib 1024 --repeats 2 [--device cuda:0] > s3-bench.json
"""

import argparse
import json
import os
import socket
import subprocess
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from datetime import datetime, timezone
from pathlib import Path

import torch
from safetensors.torch import save_file

BUCKET = "bench"


def start_server() -> subprocess.Popen:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    proc = subprocess.Popen([sys.executable, "-m", "moto.server", "-H", "127.0.0.1", "-p", str(port)],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    os.environ.update(AWS_ENDPOINT_URL=f"http://127.0.0.1:{port}", AWS_ACCESS_KEY_ID="bench",
                      AWS_SECRET_ACCESS_KEY="bench", AWS_DEFAULT_REGION="us-east-1")
    for _ in range(200):
        try:
            socket.create_connection(("127.0.0.1", port), timeout=0.1).close()
            return proc
        except OSError:
            time.sleep(0.05)
    raise SystemExit("moto_server did not start")


def make_checkpoint(folder: Path, mib: int, device: torch.device) -> dict[str, torch.Tensor]:
    """One rank's file of `mib` MiB and its manifest; the tensors' shapes, to load into."""
    from presharded.manifest import FORMAT_VERSION, Manifest, Shard, hash_file, hash_header, write_manifest

    folder.mkdir(parents=True)
    tensors = {f"layer.{i}.weight": torch.randn(4096, 4096, dtype=torch.bfloat16) for i in range(mib // 32)}
    path = folder / "model-rank-0-part-0.safetensors"
    save_file(tensors, path)
    shard = Shard(path.name, 0, 0, 0, path.stat().st_size, hash_file(path), hash_header(path))
    write_manifest(folder, Manifest(
        vllm_version="none", tensor_parallel_size=1, pipeline_parallel_size=1, enable_expert_parallel=False,
        file_pattern="model-rank-{rank}-part-{part}.safetensors", dtype="bfloat16", quantization=None,
        architecture="synthetic", source="dev/s3_bench.py", format_version=FORMAT_VERSION,
        created=datetime.now(timezone.utc).isoformat(timespec="seconds"), shards=[shard], files=[]))
    return {name: torch.empty_like(t, device=device) for name, t in tensors.items()}


def plain_gets(bucket: str, key: str, size: int, threads: int, chunk: int) -> None:
    """Parallel ranged GETs into one buffer: what the library does at best, as our reader reads."""
    from presharded.s3 import client

    buffer = memoryview(bytearray(size))

    def get(lo: int) -> None:
        body = client().get_object(Bucket=bucket, Key=key, Range=f"bytes={lo}-{min(lo + chunk, size) - 1}")["Body"]
        view, done = buffer[lo:min(lo + chunk, size)], 0
        while done < len(view):
            done += body._raw_stream.readinto(view[done:])

    with ThreadPoolExecutor(threads) as pool:
        list(pool.map(get, range(0, size, chunk)))


def timed(fn) -> float:
    start = time.perf_counter()
    fn()
    return time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--mib", type=int, default=1024)
    parser.add_argument("--threads", type=int, default=16)
    parser.add_argument("--chunk-mib", type=int, default=16)
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--device", default="cpu", help="where the weights go (cuda:0 on a GPU machine, as vLLM loads)")
    args = parser.parse_args()
    server = start_server()
    from presharded import s3
    from presharded.bench import set_cache
    from presharded.manifest import read_manifest
    from presharded.reader import Staging, load_files

    try:
        work = Path(tempfile.mkdtemp(prefix="s3-bench-"))
        device = torch.device(args.device)
        params = make_checkpoint(work / "ckpt", args.mib, device)
        path = work / "ckpt" / "model-rank-0-part-0.safetensors"
        size = path.stat().st_size
        s3.client().create_bucket(Bucket=BUCKET)
        chunk = args.chunk_mib << 20
        runs = []

        def load(files) -> None:
            load_files(files, dict(params), Staging(args.threads, chunk, device))

        for repeat in range(args.repeats):
            url = f"s3://{BUCKET}/ours-{repeat}"
            row = {"repeat": repeat,
                   "upload_ours": timed(lambda: s3.upload(work / "ckpt", url)),
                   "upload_boto3": timed(lambda: s3.client().upload_file(str(path), BUCKET, f"boto3-{repeat}"))}
            manifest = read_manifest(work / "ckpt")
            objects = s3.objects(url, manifest, [manifest.shards[0].path])
            row["read_ours"] = timed(lambda: load(objects))
            row["read_plain_gets"] = timed(lambda: plain_gets(BUCKET, f"ours-{repeat}/{path.name}", size,
                                                              args.threads, chunk))
            set_cache([path], warm=True)
            row["disk_warm_ours"] = timed(lambda: load([path]))
            set_cache([path], warm=False)
            row["disk_cold_ours"] = timed(lambda: load([path]))
            row = {k: v if k == "repeat" else round(size / v / 1e9, 3) for k, v in row.items()}  # GB/s
            runs.append(row)
            print(row, file=sys.stderr, flush=True)
        best = {k: max(r[k] for r in runs) for k in runs[0] if k != "repeat"}
        print(json.dumps({"bytes": size, "device": args.device, "threads": args.threads, "chunk_mib": args.chunk_mib,
                          "gbps": runs,
                          "best_gbps": best,
                          "read_ours_over_plain_gets": round(best["read_ours"] / best["read_plain_gets"], 3),
                          "upload_ours_over_boto3": round(best["upload_ours"] / best["upload_boto3"], 3)}))
    finally:
        server.terminate()


if __name__ == "__main__":
    main()
