"""Training losses by name: ``get_loss(name, **options)`` and what the trainer needs to know.

Every loss is called as ``loss(image_features, text_features, logit_scale, logit_bias=None,
labels=None, negative_features=None)`` and returns a scalar. As in open_clip, features are used
as given (normalise them before) and ``logit_scale`` is already exponentiated.

- ``infonce``: open_clip's ``ClipLoss``.
- ``pairwise_sigmoid``: open_clip's ``SigLipLoss``.
- ``pairwise_sigmoid_upwtdpos``: ``pairwise_sigmoid`` with each positive pair's term weighted
  by ``pos_weight``.
- ``multipos_sigmoid``: every pair whose ``labels`` are equal is a positive (weighted by
  ``pos_weight``), every other pair a negative.
- ``triplet``: ``torch.nn.functional.triplet_margin_loss`` with anchor ``image_features``,
  positive ``text_features`` (the second view) and negative ``negative_features``; the scale and
  bias are ignored.

Distributed options (every loss takes them; the trainer can pass them uniformly): ``rank``,
``world_size``, ``local_loss``, ``gather_with_grad``. ``infonce`` uses them exactly as open_clip's
``ClipLoss``. The sigmoid losses gather the text features (and, for ``multipos_sigmoid``, the
labels) of all ranks with ``all_gather``, so a same-label pair held by two ranks is a positive:
with ``local_loss`` (their default) a rank's loss is its own images against every rank's texts,
divided by its own batch size, which is exactly open_clip's ``SigLipLoss`` per rank; without it
every rank computes the loss of the whole global batch. Their ``gather_with_grad`` defaults to
true because ``SigLipLoss`` sends gradients back to the rank that owns each text; without it the
other ranks' features are constants. ``triplet`` compares each anchor only with its own positive
and negative, so it has nothing to gather. Ranks must hold equal batch sizes.
"""

from __future__ import annotations

import inspect
import math
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn


class _AllGatherWithGrad(torch.autograd.Function):
    """All ranks' tensors concatenated; each rank's part gets the gradient summed over ranks.

    (``torch.distributed.nn.all_gather`` does the same but is deprecated and warns each call.)
    """

    @staticmethod
    def forward(ctx: Any, tensor: torch.Tensor) -> torch.Tensor:
        ctx.rows = slice(dist.get_rank() * tensor.shape[0], (dist.get_rank() + 1) * tensor.shape[0])
        return torch.cat(_all_gather_constant(tensor, dist.get_world_size()), dim=0)

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor) -> torch.Tensor:
        grad = grad.contiguous().clone()
        dist.all_reduce(grad)
        return grad[ctx.rows]


def _all_gather_constant(tensor: torch.Tensor, world_size: int) -> list[torch.Tensor]:
    parts = [torch.empty_like(tensor) for _ in range(world_size)]
    dist.all_gather(parts, tensor.detach().contiguous())
    return parts


def _gather(
    tensor: torch.Tensor, *, rank: int, world_size: int, with_grad: bool, keep_local_grad: bool
) -> torch.Tensor:
    """The tensors of all ranks concatenated in rank order.

    With ``with_grad`` gradients flow back to the rank each part came from. Without it the parts
    are constants, except that ``keep_local_grad`` puts this rank's own tensor back in its slot.
    """
    if with_grad:
        return _AllGatherWithGrad.apply(tensor)
    parts = _all_gather_constant(tensor, world_size)
    if keep_local_grad:
        parts[rank] = tensor
    return torch.cat(parts, dim=0)


def _check_bool(loss: str, option: str, value: Any) -> bool:
    if not isinstance(value, bool):
        raise ValueError(f"loss {loss}: option {option} must be true or false, got {value!r}")
    return value


def _check_number(loss: str, option: str, value: Any, *, positive: bool) -> float:
    is_number = isinstance(value, int | float) and not isinstance(value, bool)
    if not is_number or not math.isfinite(value) or value < 0 or (positive and value == 0):
        wanted = "a positive number" if positive else "a number >= 0"
        raise ValueError(f"loss {loss}: option {option} must be {wanted}, got {value!r}")
    return float(value)


class _Loss(nn.Module):
    """Holds and checks the distributed options every loss takes."""

    name = ""

    def __init__(self, *, rank: int, world_size: int, local_loss: bool, gather_with_grad: bool):
        super().__init__()
        for option, value in (("rank", rank), ("world_size", world_size)):
            if not isinstance(value, int) or isinstance(value, bool):
                raise ValueError(f"loss {self.name}: option {option} must be an integer")
        if world_size < 1 or not 0 <= rank < world_size:
            raise ValueError(
                f"loss {self.name}: options rank={rank} and world_size={world_size} "
                "need 0 <= rank < world_size"
            )
        self.rank = rank
        self.world_size = world_size
        self.local_loss = _check_bool(self.name, "local_loss", local_loss)
        self.gather_with_grad = _check_bool(self.name, "gather_with_grad", gather_with_grad)

    def _check_pair(
        self, image_features: torch.Tensor, text_features: torch.Tensor, logit_scale: Any
    ) -> None:
        if image_features.ndim != 2 or image_features.shape != text_features.shape:
            raise ValueError(
                f"loss {self.name}: image and text features must be two matrices of the same "
                f"shape, got {tuple(image_features.shape)} and {tuple(text_features.shape)}"
            )
        if logit_scale is None:
            raise ValueError(f"loss {self.name} needs a logit_scale")

    def _gather(self, tensor: torch.Tensor, *, keep_local_grad: bool) -> torch.Tensor:
        return _gather(
            tensor,
            rank=self.rank,
            world_size=self.world_size,
            with_grad=self.gather_with_grad,
            keep_local_grad=keep_local_grad,
        )

    def _reject_negatives(self, negative_features: torch.Tensor | None) -> None:
        if negative_features is not None:
            raise ValueError(
                f"loss {self.name} takes no negative_features: put hard negatives in the batch, "
                "where they are in-batch negatives"
            )


class InfoNCELoss(_Loss):
    """open_clip's ``ClipLoss``: symmetric cross-entropy over image-text similarities."""

    name = "infonce"

    def __init__(
        self,
        *,
        rank: int = 0,
        world_size: int = 1,
        local_loss: bool = False,
        gather_with_grad: bool = False,
    ):
        super().__init__(
            rank=rank,
            world_size=world_size,
            local_loss=local_loss,
            gather_with_grad=gather_with_grad,
        )

    def forward(
        self,
        image_features: torch.Tensor,
        text_features: torch.Tensor,
        logit_scale: torch.Tensor | float,
        logit_bias: torch.Tensor | float | None = None,
        labels: torch.Tensor | None = None,
        negative_features: torch.Tensor | None = None,
    ) -> torch.Tensor:
        self._check_pair(image_features, text_features, logit_scale)
        self._reject_negatives(negative_features)
        batch = image_features.shape[0]
        targets = torch.arange(batch, device=image_features.device)
        if self.world_size == 1:
            per_image = logit_scale * image_features @ text_features.T
            per_text = logit_scale * text_features @ image_features.T
        else:
            # As open_clip: without local_loss every rank computes the whole global loss.
            all_images = self._gather(image_features, keep_local_grad=not self.local_loss)
            all_texts = self._gather(text_features, keep_local_grad=not self.local_loss)
            if self.local_loss:
                per_image = logit_scale * image_features @ all_texts.T
                per_text = logit_scale * text_features @ all_images.T
                targets = targets + batch * self.rank
            else:
                per_image = logit_scale * all_images @ all_texts.T
                per_text = per_image.T
                targets = torch.arange(all_images.shape[0], device=image_features.device)
        if logit_bias is not None:
            per_image = per_image + logit_bias
            per_text = per_text + logit_bias
        return (F.cross_entropy(per_image, targets) + F.cross_entropy(per_text, targets)) / 2


class _SigmoidLoss(_Loss):
    """Binary cross-entropy on every image-text pair: +1 for positives, -1 for the rest.

    A pair is positive when its row key equals its column key: the pair's global index, or for
    ``multipos_sigmoid`` its label. Positive terms are weighted by ``pos_weight``; the sum is
    divided by the number of image rows, as SigLIP.
    """

    def __init__(
        self,
        *,
        pos_weight: float = 1.0,
        rank: int = 0,
        world_size: int = 1,
        local_loss: bool = True,
        gather_with_grad: bool = True,
    ):
        super().__init__(
            rank=rank,
            world_size=world_size,
            local_loss=local_loss,
            gather_with_grad=gather_with_grad,
        )
        self.pos_weight = _check_number(self.name, "pos_weight", pos_weight, positive=True)

    def _keys(self, image_features: torch.Tensor, labels: torch.Tensor | None) -> torch.Tensor:
        """This rank's pair keys; positions in the global batch unless overridden."""
        batch = image_features.shape[0]
        return torch.arange(batch, device=image_features.device) + batch * self.rank

    def forward(
        self,
        image_features: torch.Tensor,
        text_features: torch.Tensor,
        logit_scale: torch.Tensor | float,
        logit_bias: torch.Tensor | float | None = None,
        labels: torch.Tensor | None = None,
        negative_features: torch.Tensor | None = None,
    ) -> torch.Tensor:
        self._check_pair(image_features, text_features, logit_scale)
        self._reject_negatives(negative_features)
        keys = self._keys(image_features, labels)
        rows, row_keys, columns, column_keys = image_features, keys, text_features, keys
        if self.world_size > 1:
            columns = self._gather(text_features, keep_local_grad=True)
            column_keys = torch.cat(_all_gather_constant(keys, self.world_size))
            if not self.local_loss:
                rows, row_keys = self._gather(image_features, keep_local_grad=True), column_keys
        logits = logit_scale * rows @ columns.T
        if logit_bias is not None:
            logits = logits + logit_bias
        positive = row_keys[:, None] == column_keys[None, :]
        signs = positive.to(logits.dtype) * 2 - 1
        terms = -F.logsigmoid(signs * logits)
        if self.pos_weight != 1.0:
            terms = torch.where(positive, self.pos_weight * terms, terms)
        return terms.sum() / rows.shape[0]


class PairwiseSigmoidLoss(_SigmoidLoss):
    """open_clip's ``SigLipLoss``: each image's own text is its only positive."""

    name = "pairwise_sigmoid"

    def __init__(
        self,
        *,
        rank: int = 0,
        world_size: int = 1,
        local_loss: bool = True,
        gather_with_grad: bool = True,
    ):
        super().__init__(
            pos_weight=1.0,
            rank=rank,
            world_size=world_size,
            local_loss=local_loss,
            gather_with_grad=gather_with_grad,
        )


class UpweightedPositivesSigmoidLoss(_SigmoidLoss):
    """``pairwise_sigmoid`` with each positive pair's term weighted by ``pos_weight``."""

    name = "pairwise_sigmoid_upwtdpos"


class MultiPositiveSigmoidLoss(_SigmoidLoss):
    """Sigmoid loss where every pair with equal ``labels`` is a positive, across ranks too."""

    name = "multipos_sigmoid"

    def _keys(self, image_features: torch.Tensor, labels: torch.Tensor | None) -> torch.Tensor:
        if labels is None:
            raise ValueError(
                f"loss {self.name} needs labels (one integer label per pair, e.g. the concept)"
            )
        labels = torch.as_tensor(labels, device=image_features.device)
        if labels.shape != image_features.shape[:1] or labels.is_floating_point():
            raise ValueError(
                f"loss {self.name}: labels must be {image_features.shape[0]} integers, one per "
                f"pair, got {labels.dtype} of shape {tuple(labels.shape)}"
            )
        return labels


class TripletLoss(_Loss):
    """``torch.nn.functional.triplet_margin_loss(image, text, negative, margin=margin)``."""

    name = "triplet"

    def __init__(
        self,
        *,
        margin: float = 1.0,
        rank: int = 0,
        world_size: int = 1,
        local_loss: bool = False,
        gather_with_grad: bool = False,
    ):
        super().__init__(
            rank=rank,
            world_size=world_size,
            local_loss=local_loss,
            gather_with_grad=gather_with_grad,
        )
        self.margin = _check_number(self.name, "margin", margin, positive=False)

    def forward(
        self,
        image_features: torch.Tensor,
        text_features: torch.Tensor,
        logit_scale: torch.Tensor | float | None = None,
        logit_bias: torch.Tensor | float | None = None,
        labels: torch.Tensor | None = None,
        negative_features: torch.Tensor | None = None,
    ) -> torch.Tensor:
        if negative_features is None:
            raise ValueError(f"loss {self.name} needs negative_features (one per anchor)")
        if not image_features.shape == text_features.shape == negative_features.shape:
            raise ValueError(
                f"loss {self.name}: anchor, positive and negative features must have the same "
                f"shape, got {tuple(image_features.shape)}, {tuple(text_features.shape)} and "
                f"{tuple(negative_features.shape)}"
            )
        return F.triplet_margin_loss(
            image_features, text_features, negative_features, margin=self.margin
        )


@dataclass(frozen=True)
class LossSpec:
    """What the trainer needs to know about a loss besides its options."""

    factory: Callable[..., nn.Module]
    needs_labels: bool = False
    needs_negatives: bool = False
    # Initial values of the trainable logit scale (its log, as open_clip stores it) and bias;
    # None where the loss does not use one.
    init_logit_scale: float | None = None
    init_logit_bias: float | None = None


_CLIP_INIT = math.log(1 / 0.07)
_SIGLIP_INIT = {"init_logit_scale": math.log(10.0), "init_logit_bias": -10.0}

LOSSES: dict[str, LossSpec] = {
    "infonce": LossSpec(InfoNCELoss, init_logit_scale=_CLIP_INIT),
    "pairwise_sigmoid": LossSpec(PairwiseSigmoidLoss, **_SIGLIP_INIT),
    "pairwise_sigmoid_upwtdpos": LossSpec(UpweightedPositivesSigmoidLoss, **_SIGLIP_INIT),
    "multipos_sigmoid": LossSpec(MultiPositiveSigmoidLoss, needs_labels=True, **_SIGLIP_INIT),
    "triplet": LossSpec(TripletLoss, needs_negatives=True),
}


def list_losses() -> list[str]:
    return sorted(LOSSES)


def _spec(name: str) -> LossSpec:
    if name not in LOSSES:
        raise ValueError(f"unknown loss {name!r}; known losses: {', '.join(list_losses())}")
    return LOSSES[name]


def loss_options(name: str) -> dict[str, Any]:
    """The options ``get_loss(name, ...)`` takes, with their defaults."""
    parameters = inspect.signature(_spec(name).factory).parameters.values()
    return {parameter.name: parameter.default for parameter in parameters}


def get_loss(name: str, **options: Any) -> nn.Module:
    known = loss_options(name)
    unknown = sorted(set(options) - set(known))
    if unknown:
        raise ValueError(
            f"loss {name} has no option {', '.join(unknown)}; its options: {', '.join(known)}"
        )
    return _spec(name).factory(**options)


def needs_labels(name: str) -> bool:
    return _spec(name).needs_labels


def needs_negatives(name: str) -> bool:
    return _spec(name).needs_negatives


def init_logit_scale(name: str) -> float | None:
    """The log of the initial logit scale (open_clip stores it so), or None if unused."""
    return _spec(name).init_logit_scale


def init_logit_bias(name: str) -> float | None:
    """The initial logit bias, or None where the loss has no bias."""
    return _spec(name).init_logit_bias
