"""Issue 38's S3 image figure: a snapshot image's download into this user's
memory folder as a restore makes it (presharded.s3.copier: ranged GETs, 16
at once, each against the manifest's ETag, hashed as they arrive) against
boto3's own `download_file` of the same object into the same folder (no hash),
taking turns, against moto's S3 server on 127.0.0.1.

    python dev/s3_image.py --mib 3584 --repeats 3 [--folder /dev/shm] > s3-image.json
"""

import argparse
import json
import os
import statistics
import sys
import tempfile
import time
from datetime import datetime, timezone
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from s3_bench import BUCKET, start_server  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--mib", type=int, default=1024)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--folder", default="/dev/shm", help="where the copies go (a restore's: memory)")
    args = parser.parse_args()
    server = start_server()
    try:
        import boto3

        from presharded import s3
        from presharded.manifest import FORMAT_VERSION, CopiedFile, Manifest, hash_file

        client = boto3.client("s3")
        client.create_bucket(Bucket=BUCKET)
        with tempfile.TemporaryDirectory(dir=args.folder) as work:
            image = Path(work) / "pages-1.img"
            image.write_bytes(os.urandom(args.mib * 2**20))
            entry = CopiedFile("snapshots/set/pages-1.img", image.stat().st_size, hash_file(image))
            client.upload_file(str(image), BUCKET, f"image/{entry.path}")
            etag = client.head_object(Bucket=BUCKET, Key=f"image/{entry.path}")["ETag"]
            image.unlink()
            manifest = Manifest(  # what copier reads of it: the set's sizes and ETags
                vllm_version="none", tensor_parallel_size=1, pipeline_parallel_size=1, enable_expert_parallel=False,
                file_pattern="model-rank-{rank}-part-{part}.safetensors", dtype="bfloat16", quantization=None,
                architecture="synthetic", source="dev/s3_image.py", format_version=FORMAT_VERSION,
                created=datetime.now(timezone.utc).isoformat(timespec="seconds"), shards=[], files=[],
                snapshots={"set": [entry]}, etags={entry.path: etag})
            copy = s3.copier(f"s3://{BUCKET}/image", manifest)
            runs: dict[str, list[float]] = {"ours": [], "download_file": []}
            for _ in range(args.repeats):
                target = Path(work) / "copy"
                start = time.perf_counter()
                assert copy(entry, target) == entry.blake3
                runs["ours"].append(time.perf_counter() - start)
                target.unlink()
                start = time.perf_counter()
                client.download_file(BUCKET, f"image/{entry.path}", str(target))
                runs["download_file"].append(time.perf_counter() - start)
                target.unlink()
        gbps = {k: [round(entry.size / s / 1e9, 3) for s in v] for k, v in runs.items()}
        median = {k: statistics.median(v) for k, v in gbps.items()}
        print(json.dumps({"bytes": entry.size, "folder": args.folder, "gbps": gbps,
                          "ours_over_download_file": round(median["ours"] / median["download_file"], 3)}))
    finally:
        server.terminate()


if __name__ == "__main__":
    main()
