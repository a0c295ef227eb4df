"""Several processes in one pod, DDP inside: what each process that torchrun started does.

``embedpipe.train.launch`` starts them (or Kubeflow Trainer's torchrun does); in them
``WORLD_SIZE`` is set. Every rank reads the same seeded order and takes its own contiguous
slice of each global batch; the losses gather features across ranks; only rank 0 writes.
The launching process holds the output's lock for the whole run.
"""

from __future__ import annotations

import os
from dataclasses import dataclass

import torch
import torch.distributed as dist

# Set by a launcher that holds the output's lock for the processes it starts under torchrun.
LAUNCHER_HOLDS_LOCK = "EMBEDPIPE_LAUNCHER_HOLDS_LOCK"


@dataclass(frozen=True)
class World:
    rank: int = 0
    size: int = 1
    local_rank: int = 0

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def launched() -> bool:
    return "WORLD_SIZE" in os.environ and "RANK" in os.environ


def is_main_process() -> bool:
    """Whether this process takes the output's lock: the only one, or rank 0 of those
    torchrun started, unless the process that started torchrun holds it for them all."""
    if os.environ.get(LAUNCHER_HOLDS_LOCK):
        return False
    return not launched() or int(os.environ["RANK"]) == 0


def processes_wanted(nproc_per_node: int) -> int:
    """0 means every visible GPU (one process on a machine without one)."""
    if nproc_per_node:
        return nproc_per_node
    return max(1, torch.cuda.device_count())


def setup(device: str) -> tuple[World, torch.device]:
    """Join the process group torchrun set up (gloo on CPU, nccl on GPUs)."""
    if not launched():
        if device == "auto":
            device = "cuda" if torch.cuda.is_available() else "cpu"
        return World(), torch.device(device)
    rank, size = int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"])
    local_rank = int(os.environ.get("LOCAL_RANK", rank))
    use_cuda = device.startswith("cuda") or (device == "auto" and torch.cuda.is_available())
    if use_cuda:
        torch.cuda.set_device(local_rank)
        chosen = torch.device("cuda", local_rank)
    else:
        chosen = torch.device("cpu")
    if not dist.is_initialized():
        dist.init_process_group("nccl" if use_cuda else "gloo")
    return World(rank, size, local_rank), chosen


def teardown() -> None:
    if dist.is_initialized():
        dist.destroy_process_group()
