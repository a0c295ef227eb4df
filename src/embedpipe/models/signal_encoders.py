"""Signal encoders in pure torch: a transformer over overlapping slices (AstroCLIP's
spectrum encoder) and a 1-D CNN, both on signals standardised per sample.

``forward(values, lengths)`` takes a batch padded to its longest signal (``values``,
B x L) and each signal's length; padding never changes a signal's embedding: padded
values are zeroed after standardisation, padded slices are masked out of attention
and pooling, and the CNN zeroes what lies past each signal after every convolution.
"""

from __future__ import annotations

import itertools
import math

import torch
import torch.nn.functional as F
from torch import nn

from embedpipe.models.registry import ModelEntry, ModelError
from embedpipe.models.signal_config import SignalCnnArch, SignalTransformerArch, parse_arch

STD_FLOOR = 1e-6  # a flat signal stays finite (all zeros once standardised)


def valid_mask(lengths: torch.Tensor, width: int) -> torch.Tensor:
    """B x ``width``: True where a position lies inside its signal."""
    return torch.arange(width, device=lengths.device)[None, :] < lengths[:, None]


def standardize(values: torch.Tensor, lengths: torch.Tensor) -> torch.Tensor:
    """Each signal minus its mean over its own values, divided by their standard
    deviation (population); the padding past each signal is zero."""
    values = values.float()
    mask = valid_mask(lengths, values.shape[1])
    count = lengths[:, None].to(values.dtype)
    kept = torch.where(mask, values, 0.0)
    mean = kept.sum(1, keepdim=True) / count
    centred = torch.where(mask, values - mean, 0.0)
    std = (centred.square().sum(1, keepdim=True) / count).sqrt().clamp_min(STD_FLOOR)
    return centred / std


def slice_counts(lengths: torch.Tensor, slice_length: int, slice_overlap: int) -> torch.Tensor:
    step = slice_length - slice_overlap
    counts = torch.div(lengths - slice_overlap + step - 1, step, rounding_mode="floor")
    return counts.clamp(min=1)


def slice_signals(
    standardized: torch.Tensor, counts: torch.Tensor, slice_length: int, slice_overlap: int
) -> torch.Tensor:
    """B x N x ``slice_length``: slices starting every ``slice_length - slice_overlap``
    values, the last zero-padded (N: the most slices of the batch)."""
    step = slice_length - slice_overlap
    most = int(counts.max())
    needed = (most - 1) * step + slice_length
    padded = F.pad(standardized, (0, max(0, needed - standardized.shape[1])))
    return padded[:, :needed].unfold(1, slice_length, step)


def sinusoid_positions(count: int, width: int, device: torch.device) -> torch.Tensor:
    """Fixed sine/cosine positions of ``count`` tokens: any signal length has them."""
    position = torch.arange(count, device=device, dtype=torch.float32)[:, None]
    frequency = torch.exp(
        torch.arange(0, width, 2, device=device, dtype=torch.float32) * (-math.log(10000.0) / width)
    )
    table = torch.zeros(count, width, device=device)
    table[:, 0::2] = torch.sin(position * frequency)
    table[:, 1::2] = torch.cos(position * frequency)[:, : width // 2]
    return table


class SignalEncoder(nn.Module):
    """What embed-signal needs of an encoder: its length rule and ``forward``."""

    arch: SignalTransformerArch | SignalCnnArch

    def check_length(self, length: int, where: str, name: str = "the encoder") -> None:
        """Refuse a signal this encoder (``name``) cannot take, in one line naming
        ``where`` (the file and column)."""
        fixed = self.arch.signal_length
        if fixed and length != fixed:
            raise ModelError(
                f"{where}: signals of length {length}, but {name} takes signals of "
                f"length {fixed} only"
            )
        if length < self.arch.min_signal_length:
            raise ModelError(
                f"{where}: a signal of length {length} is shorter than {name}'s minimum "
                f"{self.arch.min_signal_length}"
            )

    def _lengths(self, values: torch.Tensor, lengths: torch.Tensor | None) -> torch.Tensor:
        if lengths is None:
            return torch.full((values.shape[0],), values.shape[1], device=values.device)
        return lengths.to(values.device)


class SignalTransformer(SignalEncoder):
    def __init__(self, arch: SignalTransformerArch, embed_dim: int):
        super().__init__()
        self.arch = arch
        self.embed = nn.Linear(arch.slice_length, arch.width)
        layer = nn.TransformerEncoderLayer(
            arch.width,
            arch.heads,
            int(arch.width * arch.mlp_ratio),
            dropout=0.0,
            activation="gelu",
            batch_first=True,
            norm_first=True,
        )
        self.encoder = nn.TransformerEncoder(
            layer, arch.depth, norm=nn.LayerNorm(arch.width), enable_nested_tensor=False
        )
        if arch.pool == "query":
            self.query = nn.Parameter(torch.randn(1, 1, arch.width) * arch.width**-0.5)
            self.attention_pool = nn.MultiheadAttention(arch.width, arch.heads, batch_first=True)
        self.proj = nn.Linear(arch.width, embed_dim)

    def forward(self, values: torch.Tensor, lengths: torch.Tensor | None = None) -> torch.Tensor:
        lengths = self._lengths(values, lengths)
        arch = self.arch
        counts = slice_counts(lengths, arch.slice_length, arch.slice_overlap)
        tokens = slice_signals(
            standardize(values, lengths), counts, arch.slice_length, arch.slice_overlap
        )
        dtype = self.embed.weight.dtype
        hidden = self.embed(tokens.to(dtype))
        hidden = hidden + sinusoid_positions(tokens.shape[1], arch.width, values.device).to(dtype)
        padding = ~valid_mask(counts, tokens.shape[1])
        hidden = self.encoder(hidden, src_key_padding_mask=padding)
        if arch.pool == "query":
            query = self.query.expand(len(hidden), -1, -1).to(hidden.dtype)
            pooled = self.attention_pool(
                query, hidden, hidden, key_padding_mask=padding, need_weights=False
            )[0][:, 0]
        else:
            kept = hidden.masked_fill(padding[..., None], 0.0)
            pooled = kept.sum(1) / counts[:, None].to(kept.dtype)
        return self.proj(pooled)


class SignalCnn(SignalEncoder):
    def __init__(self, arch: SignalCnnArch, embed_dim: int):
        super().__init__()
        self.arch = arch
        widths = (1, *arch.channels)
        self.convs = nn.ModuleList(
            nn.Conv1d(a, b, arch.kernel_size, stride=arch.stride, padding=arch.kernel_size // 2)
            for a, b in itertools.pairwise(widths)
        )
        self.proj = nn.Linear(arch.channels[-1], embed_dim)

    def forward(self, values: torch.Tensor, lengths: torch.Tensor | None = None) -> torch.Tensor:
        lengths = self._lengths(values, lengths)
        hidden = standardize(values, lengths)[:, None].to(self.proj.weight.dtype)
        stride = self.arch.stride
        for conv in self.convs:
            hidden = F.gelu(conv(hidden))
            # padding kernel_size // 2 of an odd kernel: (L - 1) // stride + 1 outputs
            lengths = torch.div(lengths - 1, stride, rounding_mode="floor") + 1
            hidden = hidden * valid_mask(lengths, hidden.shape[-1])[:, None].to(hidden.dtype)
        pooled = hidden.sum(-1) / lengths[:, None].to(hidden.dtype)
        return self.proj(pooled)


def build_signal_encoder(entry: ModelEntry) -> SignalEncoder:
    """The encoder an entry describes, with torch's default initialisation (seed it)."""
    try:
        arch = parse_arch(entry.architecture, entry.arch)
    except ValueError as error:
        raise ModelError(f"[models.{entry.name}]: {error}") from None
    if isinstance(arch, SignalTransformerArch):
        return SignalTransformer(arch, entry.embed_dim)
    return SignalCnn(arch, entry.embed_dim)
