"""``embed --dim N``: write the first N dimensions of each embedding (a nested model's
prefix), renormalised when the embeddings are normalised.

The model is wrapped so that it encodes N-dimensional vectors and its entry says N, so
the schema metadata, the fixed list size and the manifest all record the dimension that
was written.
"""

from __future__ import annotations

import dataclasses

import torch

from embedpipe.config import ConfigError
from embedpipe.models.loading import LoadedModel
from embedpipe.models.registry import ModelEntry


@dataclasses.dataclass
class PrefixModel(LoadedModel):
    """A loaded model whose embeddings are the first ``entry.embed_dim`` dimensions of
    ``full_entry``'s."""

    full_entry: ModelEntry | None = None

    def _image_model(self) -> tuple[ModelEntry, torch.nn.Module]:
        entry, module = super()._image_model()
        return (self.full_entry if entry is self.entry else entry), module

    def encode_images(self, pixels: torch.Tensor) -> torch.Tensor:
        return super().encode_images(pixels)[..., : self.entry.embed_dim]

    def encode_texts(self, texts: list[str]) -> torch.Tensor:
        return super().encode_texts(texts)[..., : self.entry.embed_dim]


def prefix_model(model: LoadedModel, dim: int) -> LoadedModel:
    """``model`` itself when ``dim`` is 0; else the model writing its first ``dim``
    dimensions (the caller normalises, as it does the full embedding)."""
    full = model.entry.embed_dim
    if not dim or dim == full:
        return model
    if dim > full:
        raise ConfigError(
            f"dim: {dim} is larger than the embedding dimension {full} of {model.entry.name}"
        )
    fields = {field.name: getattr(model, field.name) for field in dataclasses.fields(model)}
    fields["entry"] = model.entry.model_copy(update={"embed_dim": dim})
    return PrefixModel(**fields, full_entry=model.entry)
