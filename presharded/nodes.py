"""One model over several machines with vLLM's multiprocessing executor
(--nnodes, --node-rank, --master-addr, --master-port): which ranks each node
runs, how a node that is not the driver knows the driver is done, and where
each node's files end up. No torch or vLLM here: the scripts check a node's
ranks before importing them."""

import argparse
import shutil
import socket
import time
from dataclasses import dataclass
from pathlib import Path

from presharded.errors import UserError
from presharded.manifest import hash_file, read_manifest
from presharded.source import copy_model_files


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

    def wait_for_driver(self, failed, poll: float = 1.0) -> None:
        """Until the driver's engine has come and gone, or `failed()`: vLLM's
        workers on other nodes outlive the driver, so the node watches it."""
        seen = False
        while not failed():
            listening = self.driver_listening()
            if seen and not listening:
                return
            seen |= listening
            time.sleep(poll)


def take_shared_files(records, staging: Path) -> set[int]:
    """Move the files other nodes wrote into the driver's `staging`, where the
    driver sees them (a folder the nodes share); the nodes whose files stay on
    disks of their own, for them to publish."""
    elsewhere = set()
    for record in records:
        folder = Path(record.folder)
        if all(present(staging, s) for s in record.shards):
            continue
        if folder != staging and all(present(folder, s) for s in record.shards):
            for shard in record.shards:
                shutil.move(folder / shard.path, staging / shard.path)
        elif record.node != 0:
            elsewhere.add(record.node)
        else:  # a worker the driver's script started on another machine (Ray): no script there publishes
            raise UserError(f"the files of rank pp={record.shards[0].pp_rank} tp={record.shards[0].tp_rank}, "
                            f"written on {record.host}, are not in {folder} here; with Ray, save into a folder "
                            "that every node shares, or use vLLM's own executor across nodes (--nnodes)")
    return elsewhere


def present(folder: Path, shard) -> bool:
    return (folder / shard.path).is_file() and (folder / shard.path).stat().st_size == shard.size


def finish_other_node(staging: Path, source: Path, node: Node):
    """After the driver is done: the manifest it sent if this node keeps its
    own files (then they are published here with the model's config and
    tokenizer), None if the driver took them into its folder."""
    manifest = read_manifest(staging)
    if manifest is None:
        if any(staging.glob("*.safetensors")):
            raise UserError(f"{node}: the driver ({node.master_addr}) ended before the save was complete; "
                            "nothing was saved here: see the driver's error, and save again on every node")
        return None
    copy_model_files(source, staging)
    for entry in manifest.files:
        if hash_file(staging / entry.path) != entry.blake3:
            raise UserError(f"{node}: {entry.path} of {source} is not the driver's; "
                            "save from the same model files on every node")
    return manifest
