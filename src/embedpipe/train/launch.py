"""Where a training runs: in this process, or in several under torchrun.

``launch_training`` is the one way in for the command line and the train component. With
``nproc_per_node`` asking for more than one process (0: every visible GPU), and this
process not one of torchrun's already, it starts ``python -m torch.distributed.run
--standalone --nproc-per-node N -m embedpipe.train.worker SPEC``, the spec a JSON file of
the inputs, the output, the settings and the model entry. This process holds the output's
lock for the whole run, before any worker starts, and stops the workers if another run
takes the output over; rank 0 hands the result back through a file.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile

from embedpipe.config import TrainSettings
from embedpipe.core import outputs, storage
from embedpipe.models.registry import ModelEntry
from embedpipe.train import stage
from embedpipe.train.distributed import LAUNCHER_HOLDS_LOCK, launched, processes_wanted
from embedpipe.train.inputs import TrainInputs
from embedpipe.train.worker import write_spec

# How often the launcher looks whether it still holds the output's lock.
LOCK_CHECK_SECONDS = 5.0


def launch_training(
    inputs: TrainInputs,
    out_uri: str,
    config: TrainSettings,
    entry: ModelEntry,
    models: dict | None = None,
) -> stage.TrainResult:
    """Train (or resume training) ``out_uri`` from ``inputs`` in as many processes as
    ``config.nproc_per_node`` asks for. ``models``: the config file's ``[models.NAME]``
    entries (e.g. the ``signal_model`` of an image_signal training)."""
    nproc = processes_wanted(config.nproc_per_node)
    if nproc > 1 and not launched():
        return train_in_processes(nproc, inputs, out_uri, config, entry, models)
    return stage.train_model(
        inputs.images, out_uri, config, entry, **inputs.keywords(), models=models
    )


def train_in_processes(
    nproc: int,
    inputs: TrainInputs,
    out_uri: str,
    config: TrainSettings,
    entry: ModelEntry,
    models: dict | None = None,
) -> stage.TrainResult:
    """One training in ``nproc`` processes under torchrun; rank 0's result."""
    with tempfile.TemporaryDirectory(prefix="embedpipe-train-") as folder:
        spec, result = os.path.join(folder, "spec.json"), os.path.join(folder, "result.json")
        write_spec(spec, inputs, out_uri, config, entry, result, models)
        status = _torchrun(nproc, spec, out_uri, inputs.uris())
        if status:
            raise RuntimeError(f"{nproc} training processes (torchrun) exited with status {status}")
        with open(result, encoding="utf-8") as handle:
            return stage.TrainResult(**json.load(handle))


def _torchrun(nproc: int, spec: str, out_uri: str, input_uris: list[str]) -> int:
    """Start the workers while this process holds the output's lock: a second run of the
    same output stops here with one line, before any process starts, and the lock covers
    the whole run, however long the workers take to start or stop. Their exit status."""
    storage.check_output_apart(out_uri, input_uris)
    command = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--standalone",
        f"--nproc-per-node={nproc}",
        "-m",
        "embedpipe.train.worker",
        spec,
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
