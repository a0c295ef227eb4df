"""What a signal encoder's registry entry says (its ``arch`` table), checked without torch.

Two architectures (``library = "signal"``):

- ``signal_transformer``: AstroCLIP's spectrum encoder. Each signal is standardised on
  its own (zero mean, unit deviation), cut into overlapping slices of ``slice_length``
  values every ``slice_length - slice_overlap`` values (the last slice zero-padded),
  each slice a token of a pre-norm transformer (``width``, ``depth``, ``heads``), pooled
  by a learned query (``pool = "query"``) or the mean of the tokens, then projected to
  ``embed_dim``.
- ``signal_cnn``: a 1-D CNN over the standardised signal (``channels``, one strided
  convolution each), pooled globally, then projected to ``embed_dim``.

``signal_length`` is the one length the encoder takes; 0: any length from
``min_signal_length`` up (batches of several lengths are padded and masked).
"""

from __future__ import annotations

import math
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

SIGNAL_LIBRARY = "signal"


class _Arch(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)

    signal_length: int = Field(0, ge=0, description="the one length it takes; 0: any length")


class SignalTransformerArch(_Arch):
    slice_length: int = Field(gt=0, description="values per slice (token)")
    slice_overlap: int = Field(0, ge=0, description="values each slice shares with the next")
    width: int = Field(gt=0, description="token width")
    depth: int = Field(gt=0, description="transformer layers")
    heads: int = Field(gt=0, description="attention heads")
    mlp_ratio: float = Field(4.0, gt=0)
    pool: Literal["query", "mean"] = Field("query", description="learned query or mean")

    @model_validator(mode="after")
    def _consistent(self) -> SignalTransformerArch:
        if self.slice_overlap >= self.slice_length:
            raise ValueError(
                f"slice_overlap {self.slice_overlap} must be below slice_length {self.slice_length}"
            )
        if self.width % self.heads:
            raise ValueError(f"width {self.width} is not a multiple of heads {self.heads}")
        if self.signal_length and self.signal_length < self.slice_length:
            raise ValueError(
                f"signal_length {self.signal_length} is shorter than one slice "
                f"({self.slice_length})"
            )
        return self

    @property
    def min_signal_length(self) -> int:
        return max(2, self.slice_length)


class SignalCnnArch(_Arch):
    channels: tuple[int, ...] = Field(min_length=1, description="channels of each convolution")
    kernel_size: int = Field(7, gt=0, description="odd kernel width")
    stride: int = Field(2, gt=0, description="stride of each convolution")

    @model_validator(mode="after")
    def _odd_kernel(self) -> SignalCnnArch:
        if self.kernel_size % 2 == 0:
            raise ValueError(f"kernel_size {self.kernel_size} must be odd")
        if any(channel <= 0 for channel in self.channels):
            raise ValueError(f"channels {self.channels} must be positive")
        return self

    @property
    def min_signal_length(self) -> int:
        return 2


ARCHITECTURES: dict[str, type[_Arch]] = {
    "signal_transformer": SignalTransformerArch,
    "signal_cnn": SignalCnnArch,
}


def parse_arch(architecture: str, arch: dict[str, Any]) -> SignalTransformerArch | SignalCnnArch:
    """The checked ``arch`` table of a signal encoder; ValueError saying what is wrong."""
    if architecture not in ARCHITECTURES:
        raise ValueError(
            f"signal architecture '{architecture}' is unknown; known: {', '.join(ARCHITECTURES)}"
        )
    try:
        return ARCHITECTURES[architecture].model_validate(arch)
    except ValidationError as error:
        problems = "; ".join(_problem(e["loc"], e["msg"]) for e in error.errors())
        raise ValueError(problems) from None


def _problem(location: tuple, message: str) -> str:
    message = message.removeprefix("Value error, ")
    return f"{'.'.join(map(str, location))}: {message}" if location else message


def slice_count(length: int, slice_length: int, slice_overlap: int) -> int:
    """Slices that cover ``length`` values (AstroCLIP: starts ``0, step, ...`` below
    ``length - overlap``)."""
    step = slice_length - slice_overlap
    return max(1, math.ceil((length - slice_overlap) / step))
