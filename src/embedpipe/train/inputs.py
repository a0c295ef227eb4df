"""What a training reads, as one value every launcher passes on: the command line, the
components, tuning, the torchrun worker's spec and the cluster's ``embedpipe train``."""

from __future__ import annotations

from dataclasses import asdict, dataclass, fields, replace
from typing import Any


@dataclass(frozen=True)
class TrainInputs:
    """The images, and the splits, mined negatives, frozen embeddings (a head's input) and
    captions where given ("" where not; ``None`` is taken as not given)."""

    images: str
    splits: str = ""
    negatives: str = ""
    embeddings: str = ""
    captions: str = ""

    def __post_init__(self) -> None:
        for name in self.names():
            if getattr(self, name) is None:
                object.__setattr__(self, name, "")

    @classmethod
    def names(cls) -> tuple[str, ...]:
        return tuple(field.name for field in fields(cls))

    @classmethod
    def parameters(cls) -> tuple[str, ...]:
        """The names ``train_model`` takes the inputs under: ``images_uri``, ``splits_uri``..."""
        return tuple(f"{name}_uri" for name in cls.names())

    def for_mode(self, mode: str) -> TrainInputs:
        """The inputs a training in ``mode`` reads: only a head reads the embeddings (a
        pipeline hands embed's output to every training step)."""
        return self if mode == "head" else replace(self, embeddings="")

    def uris(self) -> list[str]:
        """The URIs given, which the output must lie apart from."""
        return [uri for uri in asdict(self).values() if uri]

    def keywords(self) -> dict[str, str | None]:
        """``train_model``'s keyword arguments of the inputs after the images."""
        values = [getattr(self, name) or None for name in self.names()[1:]]
        return dict(zip(self.parameters()[1:], values, strict=True))

    def to_dict(self) -> dict[str, str]:
        return asdict(self)

    @classmethod
    def from_dict(cls, values: dict[str, Any]) -> TrainInputs:
        """From ``to_dict``'s output, or any mapping holding the names (parsed arguments)."""
        return cls(**{name: values.get(name) or "" for name in cls.names()})

    def flags(self) -> list[str]:
        """The inputs after the images as ``embedpipe train`` takes them: ``--NAME URI``
        for each one given."""
        flags = []
        for name in self.names()[1:]:
            if getattr(self, name):
                flags += [f"--{name}", getattr(self, name)]
        return flags
