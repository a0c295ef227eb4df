"""One rank of the two-process gradient-caching tests (gloo on CPU).

Run as ``python gradcache_dist_worker.py RANK WORLD_SIZE RENDEZVOUS_FILE OUTPUT``: for each
loss it takes its rank's rows of one global batch and saves the parameter gradients of a
plain step and of a cached step (the model wrapped in DistributedDataParallel, as the
training loop wraps it), with dropout off and on.
"""

from __future__ import annotations

import gc
import sys

import torch
from gradcache_cases import (
    LOSSES,
    Task,
    cached_gradients,
    make_batch,
    make_model,
    rank_part,
    uncached_gradients,
)
from torch.nn.parallel import DistributedDataParallel

PER_RANK, MICRO = 12, 4


def run_cases(rank: int, world_size: int) -> dict:
    results = {}
    for loss in LOSSES:
        for dropout in (0.0, 0.3):
            task = Task(loss, rank, world_size)
            model = make_model(loss, dropout)
            batch = rank_part(make_batch(loss, PER_RANK * world_size), rank, world_size)
            pieces = 1 if dropout == 0 else PER_RANK // MICRO
            torch.manual_seed(100 + rank)
            plain = uncached_gradients(model, task, batch, pieces)
            wrapped = DistributedDataParallel(model)
            torch.manual_seed(100 + rank)
            cached = cached_gradients(wrapped, model, task, batch, MICRO)
            results[f"{loss}/{dropout}"] = {"plain": plain, "cached": cached}
            del wrapped
    return results


def main() -> None:
    rank, world_size = int(sys.argv[1]), int(sys.argv[2])
    rendezvous, output_path = sys.argv[3:5]
    torch.distributed.init_process_group(
        "gloo", init_method=f"file://{rendezvous}", rank=rank, world_size=world_size
    )
    torch.save(run_cases(rank, world_size), output_path)
    gc.collect()
    torch.distributed.barrier()
    torch.distributed.destroy_process_group()


if __name__ == "__main__":
    main()
