"""Put on PYTHONPATH by tests/test_fast_loader.py. Every process that a script's engine starts takes
hold of the script's own stderr (kept at fd 99 when the script starts) and, once a rank has refused
(its note written, presharded/engine_output.py), writes to it without pause, as a worker that still
prints while the engine goes down would, until it is killed. Nothing else is changed."""

import os
import threading
import time

KEPT = 99


def chatter(out: int, note: str) -> None:
    while not os.path.exists(note):
        time.sleep(0.001)
    while True:
        os.write(out, f"chatter from pid {os.getpid()}\n".encode())
        time.sleep(0.0005)


script = os.environ.get("PRESHARDED_ENGINE_OF")  # presharded/shutdown.py marks what the script starts
if script is None:
    os.dup2(2, KEPT, inheritable=False)
elif script != str(os.getpid()) and os.environ.get("PRESHARDED_REFUSAL"):
    try:
        out = os.open(f"/proc/{script}/fd/{KEPT}", os.O_WRONLY)
    except OSError:
        out = None
    if out is not None:
        threading.Thread(target=chatter, args=(out, os.environ["PRESHARDED_REFUSAL"]), daemon=True).start()
