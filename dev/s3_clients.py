"""Issue 26: which S3 client, measured on the same transfer before choosing.

Starts moto's standalone S3 server on 127.0.0.1 (a real HTTP server, not a
mock in the client), then for each client: a multipart upload of one object
of --mib MiB from memory, and parallel ranged GETs of it (--threads at once,
--chunk-mib each) into a buffer allocated beforehand, as our loader reads.
Prints one JSON object: GB/s of the object's bytes, and the client's own CPU
seconds per GB (this process; the server runs in another), which tell
clients apart where the server limits the GB/s.

    pip install boto3 obstore "moto[server]"
    python dev/s3_clients.py --mib 1024 --threads 16 --chunk-mib 16
"""

import argparse
import io
import json
import os
import resource
import sys
import time
from concurrent.futures import ThreadPoolExecutor

from s3_bench import start_server  # moto's server on 127.0.0.1, its address in AWS_ENDPOINT_URL

BUCKET, KEY = "bench", "object.bin"


def cpu() -> float:
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime + usage.ru_stime


def ranges(size: int, chunk: int) -> list[tuple[int, int]]:
    return [(lo, min(lo + chunk, size)) for lo in range(0, size, chunk)]


def boto3_client(endpoint: str, threads: int):
    import boto3
    from botocore.config import Config

    return boto3.client("s3", endpoint_url=endpoint, aws_access_key_id="x", aws_secret_access_key="x",
                        region_name="us-east-1", config=Config(max_pool_connections=threads))


def boto3_upload(endpoint: str, data: bytes, threads: int, chunk: int) -> None:
    from boto3.s3.transfer import TransferConfig

    config = TransferConfig(multipart_threshold=chunk, multipart_chunksize=chunk, max_concurrency=threads)
    boto3_client(endpoint, threads).upload_fileobj(io.BytesIO(data), BUCKET, KEY, Config=config)


def boto3_get(endpoint: str, size: int, threads: int, chunk: int, buffer: memoryview) -> None:
    client = boto3_client(endpoint, threads)

    def get(r: tuple[int, int]) -> None:
        lo, hi = r
        body = client.get_object(Bucket=BUCKET, Key=KEY, Range=f"bytes={lo}-{hi - 1}")["Body"]
        view, done = buffer[lo:hi], 0
        while done < hi - lo:
            n = body._raw_stream.readinto(view[done:])  # urllib3's response: no copy through bytes
            if not n:
                raise RuntimeError("short read")
            done += n

    with ThreadPoolExecutor(threads) as pool:
        list(pool.map(get, ranges(size, chunk)))


def obstore_store(endpoint: str):
    from obstore.store import S3Store

    return S3Store(BUCKET, endpoint=endpoint, access_key_id="x", secret_access_key="x", region="us-east-1",
                   client_options={"allow_http": True})


def obstore_upload(endpoint: str, data: bytes, threads: int, chunk: int) -> None:
    import obstore

    obstore.put(obstore_store(endpoint), KEY, data, chunk_size=chunk, max_concurrency=threads)


def obstore_get(endpoint: str, size: int, threads: int, chunk: int, buffer: memoryview) -> None:
    import obstore

    store = obstore_store(endpoint)

    def get(r: tuple[int, int]) -> None:
        lo, hi = r
        buffer[lo:hi] = obstore.get_range(store, KEY, start=lo, end=hi)  # Rust's bytes copied into ours

    with ThreadPoolExecutor(threads) as pool:
        list(pool.map(get, ranges(size, chunk)))


CLIENTS = {"boto3": (boto3_upload, boto3_get), "obstore": (obstore_upload, obstore_get)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--mib", type=int, default=1024)
    parser.add_argument("--threads", type=int, default=16)
    parser.add_argument("--chunk-mib", type=int, default=16)
    parser.add_argument("--repeats", type=int, default=2)
    args = parser.parse_args()
    size, chunk = args.mib << 20, args.chunk_mib << 20
    data = os.urandom(size)
    proc = start_server()
    endpoint = os.environ["AWS_ENDPOINT_URL"]
    try:
        boto3_client(endpoint, 1).create_bucket(Bucket=BUCKET)
        report = {"mib": args.mib, "threads": args.threads, "chunk_mib": args.chunk_mib, "runs": []}
        buffer = memoryview(bytearray(size))
        for repeat in range(args.repeats):
            for name, (upload, get) in CLIENTS.items():  # clients take turns
                start, cpu0 = time.perf_counter(), cpu()
                upload(endpoint, data, args.threads, chunk)
                up, up_cpu = time.perf_counter() - start, cpu() - cpu0
                buffer[:] = bytes(size)
                start, cpu0 = time.perf_counter(), cpu()
                get(endpoint, size, args.threads, chunk, buffer)
                down, down_cpu = time.perf_counter() - start, cpu() - cpu0
                assert buffer == data, f"{name}: the bytes read are not the bytes written"
                run = {"client": name, "repeat": repeat, "upload_gbps": round(size / up / 1e9, 3),
                       "get_gbps": round(size / down / 1e9, 3),
                       "upload_cpu_s_per_gb": round(up_cpu / size * 1e9, 3),
                       "get_cpu_s_per_gb": round(down_cpu / size * 1e9, 3)}
                report["runs"].append(run)
                print(run, file=sys.stderr, flush=True)
        print(json.dumps(report))
    finally:
        proc.terminate()


if __name__ == "__main__":
    main()
