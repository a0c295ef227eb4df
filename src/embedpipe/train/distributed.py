"""Several processes in one pod: torchrun re-launches the command, DDP inside.

``embedpipe train --nproc-per-node N`` (N > 1, or 0 with several GPUs visible) starts
``python -m torch.distributed.run --standalone --nproc-per-node N -m embedpipe train ...``
with the same arguments; in the children ``WORLD_SIZE`` is set, so they train instead of
launching again. Every rank reads the same seeded order and takes its own contiguous
slice of each global batch; the losses gather features across ranks; only rank 0 writes.
The launching process holds the output's lock for the whole run.
"""

from __future__ import annotations

import os
import subprocess
import sys
from dataclasses import dataclass

import torch
import torch.distributed as dist

from embedpipe.core import outputs, storage

# Set by a launcher that holds the output's lock for the processes it starts under torchrun.
LAUNCHER_HOLDS_LOCK = "EMBEDPIPE_LAUNCHER_HOLDS_LOCK"
# How often the launcher looks whether it still holds that lock.
LOCK_CHECK_SECONDS = 5.0


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


def relaunch(nproc: int, argv: list[str], out_uri: str, input_uris: list[str | None]) -> int:
    """Run ``embedpipe <argv>`` under torchrun with ``nproc`` processes; its exit status."""
    return _torchrun(nproc, ["-m", "embedpipe", *argv], out_uri, input_uris)


def _torchrun(
    nproc: int, module_args: list[str], out_uri: str, input_uris: list[str | None]
) -> int:
    """Start ``nproc`` processes under torchrun while this process holds the output's lock:
    a second run of the same output stops here with one line, before any process starts,
    and the lock covers the whole run, however long the workers take to start or stop."""
    storage.check_output_apart(out_uri, input_uris)
    command = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--standalone",
        f"--nproc-per-node={nproc}",
        *module_args,
    ]
    with outputs.output_lock(out_uri) as lock:
        process = subprocess.Popen(command, env={**os.environ, LAUNCHER_HOLDS_LOCK: "1"})
        try:
            while True:
                try:
                    return process.wait(timeout=LOCK_CHECK_SECONDS)
                except subprocess.TimeoutExpired:
                    if lock.lost:  # another run took the output over: stop writing into it
                        _stop(process)
                        lock.verify_held()
        except BaseException:
            _stop(process)
            raise


def _stop(process: subprocess.Popen, grace_seconds: float = 30.0) -> None:
    """SIGTERM first, which torchrun passes on to its workers; SIGKILL if it lingers."""
    if process.poll() is None:
        process.terminate()
        try:
            process.wait(timeout=grace_seconds)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()


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


def train_in_processes(nproc: int, spec: dict) -> None:
    """Run one training, described by ``spec`` (what ``embedpipe.train.worker`` takes), in
    ``nproc`` processes under torchrun: the component's way to use every GPU of its pod."""
    import json
    import tempfile

    with tempfile.NamedTemporaryFile("w", suffix=".json", delete=False) as handle:
        json.dump(spec, handle)
    inputs = [
        spec.get(name) for name in ("images", "splits", "negatives", "embeddings", "captions")
    ]
    try:
        status = _torchrun(
            nproc, ["-m", "embedpipe.train.worker", handle.name], spec["out"], inputs
        )
    finally:
        os.remove(handle.name)
    if status:
        raise RuntimeError(f"{nproc} training processes (torchrun) exited with status {status}")
