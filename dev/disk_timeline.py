"""What the disks read while a command runs, sampled every 20 ms: when the reading began, the gaps in it,
how long the disk was busy, and how long the command ran after the last read (issue 38: where a new
node's time outside the disk goes).

    python3 dev/disk_timeline.py OUT.json -- cat FILES          # the command's stdio and exit code pass through
    python3 dev/disk_timeline.py --summary OUT.json [...]       # one line each

Each sample: seconds since the command was started, sectors read and io_ticks of every disk (/sys/block/*/stat)."""

import json
import subprocess
import sys
import time
from pathlib import Path

PERIOD = 0.02
GAP = 0.1  # a gap: this long or longer with nothing read


def disks() -> dict[str, list[int]]:
    """Each disk's (sectors read, busy milliseconds)."""
    out = {}
    for d in Path("/sys/block").iterdir():
        if not d.name.startswith(("loop", "ram", "zram")):
            fields = (d / "stat").read_text().split()
            out[d.name] = [int(fields[2]), int(fields[9])]
    return out


def record(out: Path, command: list[str]) -> int:
    samples = [(0.0, disks())]
    start = time.perf_counter()
    child = subprocess.Popen(command)
    while child.poll() is None:
        time.sleep(PERIOD)
        samples.append((time.perf_counter() - start, disks()))
    end = time.perf_counter() - start
    samples.append((end, disks()))
    out.write_text(json.dumps({"command": command, "seconds": end, "samples": samples}))
    return child.returncode


def summary(path: Path) -> str:
    data = json.loads(path.read_text())
    samples, end = data["samples"], data["seconds"]
    disk = max(samples[-1][1], key=lambda d: samples[-1][1][d][0] - samples[0][1][d][0])  # the one that read most
    reads = [(t, s[disk][0]) for t, s in samples]
    moving = [(t0, t1) for (t0, a), (t1, b) in zip(reads, reads[1:]) if b > a]
    if not moving:
        return f"{path.name}: {end:.2f} s, nothing read"
    first, last = moving[0][0], moving[-1][1]
    gaps = [(a[1], b[0]) for a, b in zip(moving, moving[1:]) if b[0] - a[1] >= GAP]
    gb = (reads[-1][1] - reads[0][1]) * 512 / 1e9
    busy = (samples[-1][1][disk][1] - samples[0][1][disk][1]) / 1000
    inside = ", ".join(f"{a:.2f}-{b:.2f}" for a, b in gaps) or "none"
    return (f"{path.name}: {end:.2f} s; {disk} read {gb:.2f} GB from {first:.2f} to {last:.2f} s "
            f"({gb / (last - first):.2f} GB/s), busy {busy:.2f} s; before it {first:.2f} s, after it {end - last:.2f} s; "
            f"gaps of {GAP} s or more: {inside} ({sum(b - a for a, b in gaps):.2f} s)")


def main() -> None:
    if sys.argv[1] == "--summary":
        for name in sys.argv[2:]:
            print(summary(Path(name)))
        return
    out, dashes, *command = sys.argv[1:]
    assert dashes == "--", __doc__
    sys.exit(record(Path(out), command))


if __name__ == "__main__":
    main()
