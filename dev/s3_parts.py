"""Upload GB/s by multipart part size and parts at once: boto3's upload_file of one
file against moto's S3 server on 127.0.0.1 (dev/s3_bench.py's), each setting in turn,
--repeats rounds. Prints one JSON object.

    python dev/s3_parts.py --mib 1024 --repeats 2 > s3-parts.json
"""

import argparse
import json
import os
import sys
import tempfile
import time
from pathlib import Path

from s3_bench import BUCKET, start_server

SETTINGS = [("boto3 default (8 MiB, 10 at once)", None), ("8 MiB, 16 at once", (8, 16)),
            ("16 MiB, 16 at once", (16, 16)), ("64 MiB, 16 at once", (64, 16))]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--mib", type=int, default=1024)
    parser.add_argument("--repeats", type=int, default=2)
    args = parser.parse_args()
    server = start_server()
    from boto3.s3.transfer import TransferConfig

    from presharded.s3 import client

    try:
        path = Path(tempfile.mkdtemp(prefix="s3-parts-")) / "file.bin"
        path.write_bytes(os.urandom(args.mib << 20))
        client().create_bucket(Bucket=BUCKET)
        rows = []
        for repeat in range(args.repeats):
            for name, setting in SETTINGS:
                extra = {} if setting is None else {
                    "Config": TransferConfig(multipart_chunksize=setting[0] << 20, max_concurrency=setting[1])}
                start = time.perf_counter()
                client().upload_file(str(path), BUCKET, f"{repeat}-{len(rows)}", **extra)
                rows.append({"repeat": repeat, "setting": name,
                             "gbps": round(path.stat().st_size / (time.perf_counter() - start) / 1e9, 3)})
                print(rows[-1], file=sys.stderr, flush=True)
        print(json.dumps({"bytes": path.stat().st_size, "uploads": rows}))
    finally:
        server.terminate()


if __name__ == "__main__":
    main()
