"""The training loop: AdamW, warm-up + cosine, clipping, accumulation, bf16 autocast,
validation, best checkpoint, early stopping, resume mid-epoch, metric lines.

A task (finetune or head) supplies the module, its batches, its loss and its
validation; the loop owns everything else, the same for both.
"""

from __future__ import annotations

import contextlib
import logging
import math
import re
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
import torch.distributed as dist
from torch import nn
from tqdm import tqdm

from embedpipe.config import ConfigError, TrainSettings
from embedpipe.models.precision import TRAINING, precision_for
from embedpipe.train import checkpoint as ckpt
from embedpipe.train.distributed import World
from embedpipe.train.divergence import stop_if_diverged
from embedpipe.train.gradcache import cached_backward
from embedpipe.train.resume_damaged import latest_readable
from embedpipe.train.run_identity import check_same_inputs, settings_difference
from embedpipe.train.sampling import MinedNegatives, batches_per_epoch, epoch_batches
from embedpipe.train.task import TrainingTask

log = logging.getLogger(__name__)

# Settings that may differ between a run and its resumption: they change neither the
# data order nor the gradients (micro_batch: gradient caching gives those of the whole
# batch, so a run resumes on another memory budget).
RUNTIME_ONLY = frozenset(
    {
        "num_workers",
        "micro_batch",
        "device",
        "checkpoint_every",
        "val_every",
        "early_stopping_patience",
        "compile",
        "grad_checkpointing",
        "nproc_per_node",
        "accelerator_type",
        "accelerator_limit",
        "num_nodes",
    }
)
# Dense bf16 peak of the GPUs the registry's batch sizes are measured on.
PEAK_FLOPS = {"B200": 2.25e15, "H200": 989e12, "H100": 989e12, "A100": 312e12, "L40S": 362e12}


HEADLINE = re.compile(r"^val_(text_)?recall_at_\d+(_dim\d+)?$")


class ResumeMismatch(ValueError):
    """The output folder holds a checkpoint of a run with other settings."""


def lr_multiplier(step: int, warmup: int, total: int) -> float:
    if step < warmup:
        return (step + 1) / warmup
    progress = (step - warmup) / max(1, total - warmup)
    return 0.5 * (1.0 + math.cos(math.pi * min(1.0, progress)))


def peak_flops(device: torch.device) -> float | None:
    if device.type != "cuda":
        return None
    name = torch.cuda.get_device_name(device)
    return next((flops for key, flops in PEAK_FLOPS.items() if key in name), None)


def metric_line(values: dict[str, Any]) -> str:
    """``name=value`` pairs a Katib StdOut collector parses (no ``/``, ``.`` or ``@``)."""
    return " ".join(
        f"{name}={value:.6g}" if isinstance(value, float) else f"{name}={value}"
        for name, value in values.items()
        if isinstance(value, int | float) and not isinstance(value, bool)
    )


@dataclass
class LoopState:
    step: int = 0
    epoch: int = 0
    position: int = 0  # micro-batch index within the epoch
    best: float | None = None
    best_step: int = -1
    bad_validations: int = 0
    history: list[dict] = field(default_factory=list)
    initial: dict[str, float] = field(default_factory=dict)
    resumed_from: int = 0


def resumable(
    out_uri: str,
    settings: dict[str, Any],
    world_size: int,
    inputs: dict[str, dict[str, Any]] | None = None,
) -> tuple[str, dict[str, Any]] | None:
    """The latest complete checkpoint in ``out_uri`` and its training state, or None.
    A checkpoint of a run with other settings or ``inputs`` (their identities) is an
    error, not silently overwritten."""
    found = ckpt.complete_checkpoints(out_uri, "last")
    if not found:
        return None
    uri, saved_config, state = latest_readable(found)
    saved = saved_config.get("train", {})
    differ = settings_difference(saved, settings)
    if inputs is not None and not differ:
        check_same_inputs(out_uri, saved_config.get("inputs"), inputs)
    if differ or int(state.get("world_size", 1)) != world_size:
        what = ", ".join(differ) or "nproc_per_node (the global batch)"
        raise ResumeMismatch(
            f"{out_uri}: holds a checkpoint of a run with other settings ({what}); "
            "give another --out, or delete that folder to start over"
        )
    return uri, state


class Loop:
    # Called as on_validation(step, metrics) after each validation on rank 0 (the tune
    # stage's pruner listens here); an exception it raises ends the run.
    on_validation: Callable[[int, dict[str, float]], None] | None = None
    # The identities of the inputs (run_identity), recorded in every checkpoint.
    inputs: dict[str, dict[str, Any]] | None = None

    def __init__(
        self,
        task: TrainingTask,
        config: TrainSettings,
        out_uri: str,
        world: World,
        device: torch.device,
        mined: MinedNegatives | None,
        settings_json: dict[str, Any],
    ):
        self.task, self.config, self.out_uri = task, config, out_uri
        self.world, self.device, self.mined = world, device, mined
        self.settings_json = settings_json
        self.global_batch = config.batch_size * world.size
        self.train_rows = task.train_rows
        if world.size > 1 and len(self.train_rows) < self.global_batch:
            # every process must get a full slice, or the feature all-gather hangs
            fits = len(self.train_rows) // world.size
            remedy = (
                f"lower --batch-size to {fits} or fewer"
                if fits
                else "train in fewer processes (--nproc-per-node)"
            )
            raise ConfigError(
                f"batch_size: {config.batch_size} per process x {world.size} processes is "
                f"more than the {len(self.train_rows)} training rows; {remedy}"
            )
        micro = batches_per_epoch(len(self.train_rows), self.global_batch)
        self.steps_per_epoch = max(1, micro // config.accumulation)
        self.total_steps = config.steps or config.epochs * self.steps_per_epoch
        self.precision = precision_for(config.precision, device, TRAINING)
        self.precision.cast(task.module)
        self.forward: nn.Module = task.module
        if world.size > 1:
            self.forward = nn.parallel.DistributedDataParallel(
                task.module,
                device_ids=[device.index] if device.type == "cuda" else None,
            )
        if config.compile:
            self.forward = torch.compile(self.forward)
        self.optimizer = torch.optim.AdamW(
            task.param_groups(),
            betas=(0.9, 0.98),
            eps=1e-6,
            fused=device.type == "cuda",
        )
        self.scheduler = torch.optim.lr_scheduler.LambdaLR(
            self.optimizer,
            lambda step: lr_multiplier(step, config.warmup_steps, self.total_steps),
        )
        self.state = LoopState()

    def autocast(self):
        return self.precision.autocasting(self.device)

    # --- checkpoints -------------------------------------------------------------------
    def _config(self, extra: dict | None = None) -> dict[str, Any]:
        inputs = {"inputs": self.inputs} if self.inputs is not None else {}
        return {
            **self.task.checkpoint_config(),
            "train": self.settings_json,
            **inputs,
            **(extra or {}),
        }

    def _training_state(self) -> dict[str, Any]:
        s = self.state
        state = {
            "optimizer": self.optimizer.state_dict(),
            "scheduler": self.scheduler.state_dict(),
            "scaler": None,
            "torch_rng": torch.get_rng_state(),
            "cuda_rng": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else [],
            "step": s.step,
            "epoch": s.epoch,
            "position": s.position,
            "best": s.best,
            "best_step": s.best_step,
            "bad_validations": s.bad_validations,
            "world_size": self.world.size,
            "initial": s.initial,
            "training_weights": self.task.training_weights(),
        }
        return state | self.task.extra_state()

    def save_last(self) -> None:
        if not self.world.is_main:
            return
        uri = ckpt.step_dir(self.out_uri, "last", self.state.step)
        ckpt.write_checkpoint(
            uri,
            self._config({"step": self.state.step}),
            self.task.weights(),
            self._training_state(),
            self.state.history,
        )
        ckpt.remove_older(self.out_uri, "last", self.state.step, keep_previous=True)

    def save_best(self, metrics: dict[str, float]) -> None:
        if not self.world.is_main:
            return
        uri = ckpt.step_dir(self.out_uri, "best", self.state.step)
        extra = {"step": self.state.step, "metrics": metrics}
        ckpt.write_checkpoint(uri, self._config(extra), self.task.weights())
        ckpt.remove_older(self.out_uri, "best", self.state.step)

    def restore(self, uri: str, state: dict[str, Any]) -> None:
        self.task.load_training_weights(state["training_weights"])
        self.optimizer.load_state_dict(state["optimizer"])
        self.scheduler.load_state_dict(state["scheduler"])
        torch.set_rng_state(state["torch_rng"])
        if state["cuda_rng"] and torch.cuda.is_available():
            torch.cuda.set_rng_state_all(state["cuda_rng"])
        s = self.state
        s.step, s.epoch, s.position = state["step"], state["epoch"], state["position"]
        s.best, s.best_step = state["best"], state["best_step"]
        s.bad_validations = state["bad_validations"]
        s.initial = dict(state["initial"])
        s.history = ckpt.read_history(uri)
        s.resumed_from = s.step
        self.task.load_extra_state(state)

    # --- validation --------------------------------------------------------------------
    def validate(self) -> dict[str, float]:
        metrics = self.task.evaluate(self.autocast)
        if metrics and self.world.is_main:
            self.emit({"step": self.state.step, **_headline(metrics)})
            if self.on_validation is not None:
                self.on_validation(self.state.step, metrics)
        return metrics

    def _judge(self, metrics: dict[str, float]) -> bool:
        """Record a validation; True when early stopping says stop."""
        name = self.config.best_metric
        if name not in metrics:
            raise ValueError(
                f"best_metric: validation has no metric {name!r}; "
                f"it reports {', '.join(sorted(_headline(metrics)))}"
            )
        s = self.state
        if s.best is None or metrics[name] > s.best:
            s.best, s.best_step, s.bad_validations = metrics[name], s.step, 0
            self.save_best(metrics)
            return False
        s.bad_validations += 1
        patience = self.config.early_stopping_patience
        return bool(patience) and s.bad_validations >= patience

    def emit(self, values: dict[str, Any]) -> None:
        tqdm.write(metric_line(values), file=sys.stdout)
        sys.stdout.flush()

    def _reduce_mean(self, value: torch.Tensor) -> torch.Tensor:
        value = value.detach().float().clone()
        if self.world.size > 1:
            dist.all_reduce(value)
            value /= self.world.size
        return value

    # --- the loop ----------------------------------------------------------------------
    def run(self) -> LoopState:
        config, s = self.config, self.state
        has_validation = len(self.task.queries) > 0
        if s.step == 0 and has_validation and not s.initial:
            s.initial = self.validate()  # the untrained model, for comparison
            if s.initial:
                s.history.append({"step": 0, **s.initial})
        rank, size, batch = self.world.rank, self.world.size, config.batch_size
        log_every = max(1, self.total_steps // 50)
        flops = None
        peak = peak_flops(self.device)
        progress = tqdm(
            total=self.total_steps,
            initial=s.step,
            desc="train",
            unit="step",
            disable=None if self.world.is_main else True,
        )
        window_start, window_samples = time.perf_counter(), 0
        stop = s.step >= self.total_steps
        micro_done, running = 0, 0.0
        while not stop:
            batches = epoch_batches(
                self.train_rows,
                self.global_batch,
                config.seed,
                s.epoch,
                self.mined,
                config.hard_negative_share,
            )
            local = [b[rank * batch : (rank + 1) * batch] for b in batches[s.position :]]
            for micro in self.task.batches(s.epoch, local):
                if flops is None and peak is not None:
                    flops = self.task.flops_per_sample(micro)
                last_micro = (micro_done + 1) % config.accumulation == 0
                sync = (
                    self.forward.no_sync()
                    if size > 1 and not last_micro and hasattr(self.forward, "no_sync")
                    else contextlib.nullcontext()
                )
                # a micro-batch that holds the whole batch leaves nothing to cache
                if 0 < config.micro_batch < len(micro["rows"]):
                    loss = cached_backward(
                        self.task,
                        self.forward,
                        micro,
                        config.micro_batch,
                        self.autocast,
                        synchronise=last_micro,
                        divide=config.accumulation,
                    )
                else:
                    with sync, self.autocast():
                        loss = self.task.loss_of(self.forward, micro)
                    (loss / config.accumulation).backward()
                running += float(loss.detach()) / config.accumulation
                micro_done += 1
                s.position += 1
                window_samples += len(micro["rows"]) * size
                if not last_micro:
                    continue
                loss_value = float(self._reduce_mean(torch.tensor(running)))
                stop_if_diverged(self.task.module, loss_value, s.step + 1, self.out_uri)
                if config.grad_clip:
                    torch.nn.utils.clip_grad_norm_(self.task.module.parameters(), config.grad_clip)
                lr = self.optimizer.param_groups[0]["lr"]
                self.optimizer.step()
                self.optimizer.zero_grad(set_to_none=True)
                self.scheduler.step()
                extra = self.task.after_step(self._reduce_mean)
                running = 0.0
                s.step += 1
                progress.update(1)
                record: dict[str, Any] = {"step": s.step, "epoch": s.epoch, "loss": loss_value}
                record["lr"] = lr
                record |= extra
                if s.step % log_every == 0 or s.step == self.total_steps:
                    elapsed = time.perf_counter() - window_start
                    record["samples_per_s"] = window_samples / elapsed if elapsed else 0.0
                    if flops and peak:
                        record["mfu"] = flops * record["samples_per_s"] / (peak * size)
                    window_start, window_samples = time.perf_counter(), 0
                    if self.world.is_main:
                        self.emit(record)
                        progress.set_postfix(loss=f"{loss_value:.4f}")
                validated = False
                if has_validation and config.val_every and s.step % config.val_every == 0:
                    metrics = self.validate()
                    record |= _headline(metrics)
                    validated = True
                s.history.append(record)
                if validated:
                    stop = self._judge(metrics)
                stop = stop or s.step >= self.total_steps
                if stop or (config.checkpoint_every and s.step % config.checkpoint_every == 0):
                    if stop and has_validation and not validated:
                        metrics = self.validate()
                        s.history[-1] |= _headline(metrics)
                        self._judge(metrics)
                    self.save_last()
                if stop:
                    break
            if not stop:
                s.epoch, s.position = s.epoch + 1, 0
        progress.close()
        return s


def _headline(metrics: dict[str, float]) -> dict[str, float]:
    """The overall metrics (per-category ones go to metrics.json only)."""
    return {k: v for k, v in metrics.items() if HEADLINE.match(k)}


def history_curves(history: list[dict]) -> dict[str, list]:
    keys = sorted({key for record in history for key in record if key != "step"})
    return {
        key: [[r["step"], r[key]] for r in history if key in r and not isinstance(r[key], str)]
        for key in keys
    }


def mean_of(values: list[float]) -> float:
    return float(np.mean(values)) if values else 0.0
