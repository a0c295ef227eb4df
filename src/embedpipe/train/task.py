"""What the training loop asks of a task (finetune or head), and the answers most tasks give.

The loop owns the optimizer, schedule, accumulation, checkpoints and validation schedule; a
task supplies the module, its batches, its loss, its validation and what its checkpoints hold.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from typing import Protocol

import numpy as np
import torch
from torch import nn


class TrainingTask(Protocol):
    module: nn.Module  # what the optimizer trains and DDP wraps
    train_rows: np.ndarray  # example rows the loop draws batches from
    queries: np.ndarray  # validation query rows; none: no validation

    def param_groups(self) -> list[dict]:
        """The optimizer's parameter groups (see ``train.optim``)."""
        ...

    def batches(self, epoch: int, micro_batches: list[list[int]]) -> Iterator[dict]:
        """One batch per list of rows, each with its ``rows``, ready on the device."""
        ...

    def loss_of(self, forward: nn.Module, batch: dict) -> torch.Tensor:
        """The loss of a batch through ``forward`` (the module, maybe wrapped)."""
        ...

    def features_of(self, forward: nn.Module, batch: dict) -> tuple:
        """What the loss reads of a batch: features (and scale, bias) through ``forward``;
        gradient caching runs this per micro-batch."""
        ...

    def loss_from(self, features: tuple, batch: dict) -> torch.Tensor:
        """The loss of the features ``features_of`` gave, over the whole batch."""
        ...

    def flops_per_sample(self, batch: dict) -> float:
        """Forward and backward FLOPs of one sample (for the MFU)."""
        ...

    def evaluate(self, autocast: Callable) -> dict[str, float]:
        """Validation metrics; ``autocast()`` gives the training precision."""
        ...

    def weights(self) -> dict[str, torch.Tensor]:
        """What a checkpoint publishes as the model."""
        ...

    def checkpoint_config(self) -> dict:
        """What a checkpoint's ``config.json`` says of the model."""
        ...

    def training_weights(self) -> dict[str, torch.Tensor]:
        """What training resumes from (for a head, before its standardisation is folded in)."""
        ...

    def load_training_weights(self, state: dict[str, torch.Tensor]) -> None: ...

    def after_step(self, reduce: Callable[[torch.Tensor], torch.Tensor]) -> dict:
        """Called after each optimizer step; ``reduce`` averages a tensor over the ranks.
        Returns values for the step's metric line."""
        ...

    def extra_state(self) -> dict:
        """Task state a resumed run needs besides its weights."""
        ...

    def load_extra_state(self, state: dict) -> None: ...

    def summary(self) -> dict:
        """What the task adds to the run's metrics.json."""
        ...


class TaskDefaults:
    """The answers of a task with no state beyond its weights and nothing to add."""

    def loss_of(self, forward: nn.Module, batch: dict) -> torch.Tensor:
        return self.loss_from(self.features_of(forward, batch), batch)

    def after_step(self, reduce: Callable[[torch.Tensor], torch.Tensor]) -> dict:
        return {}

    def extra_state(self) -> dict:
        return {}

    def load_extra_state(self, state: dict) -> None:
        return None

    def summary(self) -> dict:
        return {}
