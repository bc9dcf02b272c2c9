"""One model over several machines with vLLM's multiprocessing executor
(--nnodes, --node-rank, --master-addr, --master-port): which ranks each node
runs, and how the nodes know that the others are alive and that the driver
is done (where each node's files end up: presharded/save.py). No torch or
vLLM here: the scripts check a node's ranks before importing them."""

import argparse
import json
import select
import socket
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass

from presharded.errors import UserError
from presharded.shutdown import failure, first_on_interrupt, watched_by


@dataclass(frozen=True)
class Node:
    rank: int = 0
    count: int = 1
    master_addr: str = "127.0.0.1"
    master_port: int = 29501

    @classmethod
    def from_args(cls, args: argparse.Namespace) -> "Node":
        return cls(args.node_rank or 0, args.nnodes or 1, args.master_addr or cls.master_addr,
                   args.master_port or cls.master_port)

    @property
    def is_driver(self) -> bool:
        return self.rank == 0

    def __str__(self) -> str:
        return f"node {self.rank} of {self.count}"

    def ranks(self, tensor_parallel_size: int, pipeline_parallel_size: int) -> list[tuple[int, int]]:
        """(pipeline stage, tensor-parallel rank) of every worker this node runs:
        vLLM numbers workers stage by stage, tensor-parallel rank fastest, and
        gives each node an equal, consecutive share."""
        world = tensor_parallel_size * pipeline_parallel_size
        per_node = world // self.count
        return [divmod(r, tensor_parallel_size) for r in range(self.rank * per_node, (self.rank + 1) * per_node)]

    def driver_listening(self) -> bool:
        """Whether the driver's workers hold the master port (their process group's store)."""
        try:
            with socket.create_connection((self.master_addr, self.master_port), timeout=2):
                return True
        except OSError:
            return False


BEAT = 0.25  # seconds between a node's signs of life
SILENT = 10.0  # seconds without one: that node is gone
JOIN = 60.0  # seconds the nodes may take to reach each other: a start of every node within a minute


class Liveness:
    """The nodes of one engine watch each other, so that when one dies the
    others end within seconds instead of waiting on it for minutes. From
    its start, each node's script holds a connection to the driver's script
    (on --master-port + 1) and both send a line every BEAT: a connection that
    closes (its script died) or falls silent (its machine died) ends the
    other side through `on_loss`, until the driver has said the work is done.
    Before any engine starts, the nodes agree on what they run (`agree`).

    Each message is a line: "." a beat, "M json" what a node runs, "K" all
    agree, "X reason" they do not, "D" the driver is done, "A" heard."""

    def __init__(self, node: Node, work: str, on_loss: Callable[[str], None]) -> None:
        self.node, self.work, self.on_loss = node, work, on_loss
        self.done = threading.Event()  # the driver said the work is complete, and every node heard it
        self._finish = threading.Event()
        self._mine: dict | None = None  # what this node runs, once its checks passed (`agree`)
        self._agreed = threading.Event()
        self.port = node.master_port + 1
        self._server = None
        self._links: list[socket.socket] = []
        if node.is_driver:
            try:
                self._server = socket.create_server(("", self.port))
            except OSError as e:
                raise UserError(f"cannot listen on port {self.port} (--master-port + 1: {e.strerror}), where the "
                                "nodes watch each other; choose another --master-port")
        watched_by(SILENT + 4 * BEAT)
        first_on_interrupt(self._close_links)
        threading.Thread(target=self._watch, daemon=True, name="presharded-liveness").start()

    def agree(self, mine: dict) -> None:
        """Before the engine starts: wait until every node has said what it runs (`mine`: the checkpoint,
        the layout, ...) and the driver found them equal; otherwise every node ends in one line."""
        self._mine = mine
        while not self._agreed.wait(BEAT):
            if reason := failure():  # the watcher's word, where its signal could not reach us (SIGINT ignored)
                raise UserError(reason)

    def finish(self, timeout: float = 10.0) -> None:
        """The driver's work is complete: tell the other nodes, and wait until they heard it."""
        self._finish.set()
        self.done.wait(timeout)

    def wait_for_driver(self, failed: Callable[[], bool]) -> None:
        """On a node that is not the driver: until the driver has said it is done
        and its engine has gone; a failure here ends this node (`on_loss`)."""
        while not (self.done.is_set() and not self.node.driver_listening()):
            if failed():
                self.on_loss(f"{self.node}: a worker of this node died during {self.work}; see the messages above")
            time.sleep(BEAT)

    def _close_links(self) -> None:
        for link in list(self._links):
            try:
                link.shutdown(socket.SHUT_RDWR)  # the other side reads its end at once; our select wakes too
            except OSError:
                pass

    def _lost(self, reason: str) -> None:
        if not (self.done.is_set() or self._finish.is_set()):
            self.on_loss(reason)

    def _watch(self) -> None:
        try:
            if self.node.is_driver:
                self._serve()
            else:
                self._follow()
        except Exception as e:  # a watcher must not die quietly: say why, end the run
            self._lost(f"{self.node}: watching the other nodes failed ({e}); start every node again")

    def _follow(self) -> None:
        """A node that is not the driver: reach it, say what this node runs, then beat until it says done."""
        deadline = time.monotonic() + JOIN
        while True:
            try:
                link = socket.create_connection((self.node.master_addr, self.port), timeout=2)
                self._links.append(link)
                break
            except OSError:
                if time.monotonic() > deadline:
                    return self._lost(f"{self.node}: the driver (node 0) did not answer at "
                                      f"{self.node.master_addr}:{self.port} within {JOIN:.0f} s; start it with "
                                      "--node-rank 0 and the same --master-addr and --master-port")
                time.sleep(BEAT)
        lines = Lines(link)
        send(link, str(self.node.rank))
        heard, told = time.monotonic(), False
        while True:
            if not told and self._mine is not None:
                told = send(link, "M " + json.dumps(self._mine, sort_keys=True))
            if select.select([link], [], [], BEAT)[0]:
                received = lines.read()
                if received is None:
                    return self._lost(f"{self.node}: node 0, the driver ({self.node.master_addr}), ended before "
                                      f"{self.work} was complete; see its error, and start every node again")
                heard = time.monotonic()
                for line in received:
                    if line.startswith("X "):
                        return self._lost(line[2:])
                    if line == "K":
                        self._agreed.set()
                    if line == "D":
                        send(link, "A")
                        self.done.set()
                        return
            if time.monotonic() - heard > SILENT:
                return self._lost(f"{self.node}: node 0, the driver ({self.node.master_addr}), stopped answering "
                                  f"during {self.work} (nothing for {SILENT:.0f} s); start every node again")
            send(link, ".")  # a failure shows as a closed connection above

    def _serve(self) -> None:
        """The driver: every other node connects, says what it runs, and must keep beating until it has
        heard done."""
        links: dict[socket.socket, tuple[Lines, int | None]] = {}
        heard: dict[int, float] = {}
        theirs: dict[int, dict] = {}
        acked: set[int] = set()
        others = set(range(1, self.node.count))
        deadline = time.monotonic() + JOIN
        while acked != others:
            readable = select.select([self._server, *links], [], [], BEAT)[0]
            now = time.monotonic()
            for conn in readable:
                if conn is self._server:
                    accepted = self._server.accept()[0]
                    links[accepted] = (Lines(accepted), None)
                    self._links.append(accepted)
                    continue
                lines, rank = links[conn]
                received = lines.read()
                if rank is None:  # its first line names its node
                    first = (received or [""])[0]
                    rank = int(first) if first.isdigit() else -1
                    if rank not in others or rank in heard:
                        conn.close()
                        del links[conn]
                        continue
                    links[conn] = (lines, rank)
                    received = received[1:]
                elif received is None and rank in acked:  # it heard done and went
                    del links[conn]
                    continue
                elif received is None:
                    return self._lost(f"node {rank} of {self.node.count} ended during {self.work} (its script is "
                                      "gone); see its error, and start every node again")
                heard[rank] = now
                for line in received:
                    if line.startswith("M "):
                        theirs[rank] = json.loads(line[2:])
                    acked |= {rank} if line == "A" else set()
            if self._mine is not None and not self._agreed.is_set() and set(theirs) == others:
                if reason := differ(self._mine, theirs, self.node.count):
                    for conn in links:
                        send(conn, f"X {reason}")
                    return self._lost(reason)
                for conn in links:
                    send(conn, "K")
                self._agreed.set()
            for rank in others - acked:
                if rank in heard and now - heard[rank] > SILENT:
                    return self._lost(f"node {rank} of {self.node.count} stopped answering during {self.work} "
                                      f"(nothing from it for {SILENT:.0f} s); see its error, and start every "
                                      "node again")
                if rank not in heard and now > deadline:
                    return self._lost(f"node {rank} of {self.node.count} did not join within {JOIN:.0f} s; start it "
                                      "with the same --master-addr and --master-port")
            for conn, (_, rank) in list(links.items()):
                if rank is not None and rank not in acked:
                    send(conn, "D" if self._finish.is_set() else ".")  # a failure shows as a closed connection
        self.done.set()


def differ(mine: dict, theirs: dict[int, dict], count: int) -> str | None:
    """Why the nodes cannot run one engine together, if they cannot: the first thing a node runs
    otherwise than the driver."""
    for rank, what in sorted(theirs.items()):
        for key in sorted(set(mine) | set(what)):
            if mine.get(key) != what.get(key):
                return (f"node {rank} of {count} runs {key} {what.get(key)!r}, node 0 {mine.get(key)!r}: the nodes "
                        "must run the same; start every node with the same checkpoint (or model) and flags")
    return None


def send(conn: socket.socket, line: str) -> bool:
    """`line` sent, whole; False if the other side has gone (which shows as a closed connection)."""
    try:
        conn.sendall(line.encode() + b"\n")
        return True
    except OSError:
        return False


class Lines:
    """The lines that came on a connection, whole ones only; None once the other side is gone."""

    LIMIT = 1 << 20  # a line longer than this is not one of ours

    def __init__(self, conn: socket.socket) -> None:
        self.conn, self.rest = conn, b""

    def read(self) -> list[str] | None:
        try:
            data = self.conn.recv(65536)
        except OSError:  # reset: it died with bytes unread
            return None
        if not data or len(self.rest) + len(data) > self.LIMIT:
            return None
        *whole, self.rest = (self.rest + data).split(b"\n")
        return [line.decode(errors="replace") for line in whole]
