"""What is evaluated: a model (embeddings computed here) or precomputed embeddings.

A model is named by ``--weights``: a registry entry (its own weights), an embedpipe
checkpoint folder (its ``config.json`` names the entry), ``local-dir:DIR`` (open_clip's
Hugging Face layout), or a weights file / ``random`` / ``s3://`` prefix for the entry
``[evaluate].model``. Precomputed embeddings are an ``embed`` output, with an
``embed-text`` output for the texts (class prompts, captions) when text tasks run.
"""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass
from typing import Any

import numpy as np

from embedpipe.config.evaluate import EvaluateSettings
from embedpipe.core import datasets, storage
from embedpipe.core.schemas import EMBEDDINGS_KIND, TEXT_EMBEDDINGS_KIND

LOCAL_DIR = "local-dir:"

log = logging.getLogger(__name__)


class MissingGroundTruth(ValueError):
    """The data (or the model) lacks what an asked metric needs."""


@dataclass(frozen=True)
class ModelSource:
    weights: str
    name: str = ""


@dataclass(frozen=True)
class EmbeddingsSource:
    embeddings: str
    text_embeddings: str = ""
    name: str = ""


Source = ModelSource | EmbeddingsSource


def _matrix(table, column: str = "embedding") -> np.ndarray:
    array = table.column(column).combine_chunks()
    dim = array.type.list_size
    return np.asarray(array.flatten(), dtype=np.float32).reshape(-1, dim)


class PrecomputedEncoder:
    def __init__(self, source: EmbeddingsSource):
        self.source = source.embeddings
        manifest = datasets.read_manifest(source.embeddings, EMBEDDINGS_KIND)
        base = os.path.basename(storage.normalize(source.embeddings).rstrip("/"))
        self.name = source.name or (
            f"{manifest['model']} ({base})" if "model" in manifest else base
        )
        table = datasets.read_table(source.embeddings, EMBEDDINGS_KIND, ["image_id", "embedding"])
        self._ids = {i: k for k, i in enumerate(table.column("image_id").to_pylist())}
        self._vectors = _matrix(table)
        self._texts: dict[str, int] | None = None
        self.text_source = source.text_embeddings
        if source.text_embeddings:
            texts = datasets.read_table(source.text_embeddings, TEXT_EMBEDDINGS_KIND)
            self._texts = {t: k for k, t in enumerate(texts.column("text").to_pylist())}
            self._text_vectors = _matrix(texts)

    @property
    def has_text(self) -> bool:
        return self._texts is not None

    def why_no_text(self) -> str:
        return f"{self.source}: precomputed image embeddings without --text-embeddings"

    def images(self, ids: list[str]) -> np.ndarray:
        missing = [i for i in ids if i not in self._ids]
        if missing:
            raise MissingGroundTruth(
                f"{self.source}: no embedding for {len(missing)} of the {len(ids)} images "
                f"evaluated (e.g. {missing[0]}); embed them, or evaluate a selection they cover"
            )
        return self._vectors[[self._ids[i] for i in ids]]

    def texts(self, texts: list[str]) -> np.ndarray:
        assert self._texts is not None
        missing = [t for t in dict.fromkeys(texts) if t not in self._texts]
        if missing:
            raise MissingGroundTruth(
                f"{self.text_source}: no embedding for {len(missing)} text(s) the evaluation "
                f"needs (e.g. {missing[0]!r}); embed the prompts and captions with embed-text"
            )
        return self._text_vectors[[self._texts[t] for t in texts]]


class ModelEncoder:
    """A model run on the images (and texts) through the embedding engine: the loader of
    ``embed``, in the inference meaning of ``[evaluate].precision``."""

    def __init__(
        self,
        source: ModelSource,
        config: EvaluateSettings,
        images_uri: str,
        models: dict[str, dict[str, Any]] | None = None,
    ):
        from embedpipe.embed.runtime import resolve_device

        self.source = source.weights
        self.images_uri = images_uri
        self.config = config
        self.device = resolve_device(config.device)
        self._load(source.weights, models)
        self.name = source.name or self.name

    def _load(self, weights: str, models: dict[str, dict[str, Any]] | None) -> None:
        """A registry name, a trained checkpoint or head (its config.json names the entry),
        a published model (local-dir:, hf-hub:), or weights of ``[evaluate].model``."""
        from embedpipe.embed.runtime import ready_for_inference
        from embedpipe.models.loading import checkpoint_entry, entry_for_weights, load_model
        from embedpipe.models.registry import get_entry, load_registry

        registry = load_registry(models)
        if weights in registry:
            entry, weights = registry[weights], ""
        else:
            entry = entry_for_weights(weights) or checkpoint_entry(weights)
            if entry is None and self.config.model:
                entry = get_entry(self.config.model, models)
            if entry is None:
                raise ValueError(
                    f"--weights {weights}: not a registry entry, a checkpoint folder or a "
                    "published model (local-dir:, hf-hub:); set [evaluate].model to the "
                    "registry entry these weights belong to"
                )
        model = load_model(entry, weights, str(self.device), self.config.tokenizer_dir)
        suffix = f" ({os.path.basename(os.path.normpath(weights))})" if weights else ""
        self.name = entry.name + suffix
        self.inference = ready_for_inference(
            model, self.device, self.config.precision, self.config.batch_size
        )
        # A head projects image embeddings only: its backbone's text tower is not its own.
        self.has_text = entry.text and model.backbone_entry is None

    def why_no_text(self) -> str:
        return f"{self.name}: an image-only model has no text tower"

    def images(self, ids: list[str]) -> np.ndarray:
        from embedpipe.embed.loader import MissingImages, UndecodableImages, vectors_for
        from embedpipe.embed.runtime import LoaderOptions, default_workers

        if not self.images_uri:
            raise MissingGroundTruth(
                "evaluating a model needs the images: give --images (an `ingest` output)"
            )
        # Pillow and the model's own transform: exact to open_clip, as clip_benchmark runs
        options = LoaderOptions("pil", default_workers(self.device, "pil"), normalize=False)
        try:
            return vectors_for(self.images_uri, ids, self.inference, options)
        except UndecodableImages as error:
            raise ValueError(
                f"{error}; evaluate a selection without it (dedup or select), or ingest it again"
            ) from None
        except MissingImages as error:
            raise MissingGroundTruth(
                f"{self.images_uri}: {len(error.missing)} image(s) of the metadata are not in "
                f"the images dataset (e.g. {error.missing[0]})"
            ) from error

    def texts(self, texts: list[str]) -> np.ndarray:
        chunks = []
        with self.inference.running():
            for start in range(0, len(texts), self.config.batch_size):
                batch = texts[start : start + self.config.batch_size]
                chunks.append(self.inference.encode_texts(batch, normalize=False).cpu().numpy())
        return np.concatenate(chunks)


class ProjectedEncoder:
    """A projection head on precomputed embeddings of its own backbone (the same model,
    weights, seed and normalisation, as the embeddings' manifest and the head's config
    record them): the head projects the very vectors it was trained on, where a
    ``ModelEncoder`` would run every image through the backbone again."""

    has_text = False
    ROWS_PER_PASS = 65536

    def __init__(self, source: ModelSource, directory: str, embeddings: EmbeddingsSource, device):
        import torch

        from embedpipe.models.heads import HeadOnBackbone, backbone_of, load_head_checkpoint

        head, backbone, saved = load_head_checkpoint(directory)
        self.source = source.weights
        self.embeddings_source = embeddings.embeddings
        self.name = source.name or (
            f"{backbone.name}+head ({os.path.basename(os.path.normpath(source.weights))})"
        )
        normalized = backbone_of(saved)["normalized"]
        self._module = HeadOnBackbone(torch.nn.Identity(), head, normalized).to(device).eval()
        self._embeddings = PrecomputedEncoder(EmbeddingsSource(embeddings.embeddings))
        self._device = device
        self._torch = torch

    def why_no_text(self) -> str:
        return f"{self.name}: a projection head has no text tower"

    def images(self, ids: list[str]) -> np.ndarray:
        vectors = self._embeddings.images(ids)
        parts = []
        with self._torch.inference_mode():
            for start in range(0, len(vectors), self.ROWS_PER_PASS):
                rows = self._torch.from_numpy(vectors[start : start + self.ROWS_PER_PASS])
                parts.append(self._module.project(rows.to(self._device)).float().cpu().numpy())
        return np.concatenate(parts) if parts else np.zeros((0, 0), dtype=np.float32)


def _head_checkpoint(weights: str) -> tuple[str, dict[str, Any]] | None:
    """The local folder and config.json of an embedpipe head checkpoint at ``weights``;
    None for anything else (``ModelEncoder`` loads it, or says what is wrong with it)."""
    import json

    from embedpipe.models.heads import is_head_config
    from embedpipe.models.loading import RANDOM_WEIGHTS, fetch_weights

    if not weights or weights == RANDOM_WEIGHTS or ":" in weights.split("://")[0]:
        return None  # a registry name, random weights, local-dir: or hf-hub:
    directory = fetch_weights(weights)
    try:
        with open(os.path.join(directory, "config.json"), encoding="utf-8") as handle:
            config = json.load(handle)
    except (OSError, ValueError):
        return None
    return (directory, config) if isinstance(config, dict) and is_head_config(config) else None


def _backbone_difference(manifest: dict[str, Any], head_config: dict[str, Any]) -> str:
    """What tells the embeddings' model apart from the head's backbone; "" if nothing."""
    from embedpipe.models.heads import backbone_of

    described = backbone_of(head_config)
    pairs = {
        "model": (manifest.get("model"), described["entry"].get("name")),
        "weights": (manifest.get("weights"), described["weights"]),
        "seed": (int(manifest.get("seed", 0)), int(described["seed"])),
        "normalized": (bool(manifest.get("normalized", True)), bool(described["normalized"])),
        "dim": (manifest.get("dim"), (head_config.get("head") or {}).get("in_dim")),
    }
    for field, (theirs, ours) in pairs.items():
        if theirs != ours:
            return f"{field} {theirs!r}, the head's backbone {ours!r}"
    return ""


def open_source(
    source: Source,
    config: EvaluateSettings,
    images_uri: str,
    models: dict[str, dict[str, Any]] | None = None,
    precomputed: list[EmbeddingsSource] | tuple[EmbeddingsSource, ...] = (),
):
    """The encoder of ``source``; a head checkpoint beside embeddings of its own backbone
    (among ``precomputed``) projects those instead of re-embedding the images."""
    if isinstance(source, EmbeddingsSource):
        return PrecomputedEncoder(source)
    head = _head_checkpoint(source.weights) if precomputed else None
    if head is not None:
        directory, head_config = head
        for embeddings in precomputed:
            manifest = datasets.read_manifest(embeddings.embeddings, EMBEDDINGS_KIND)
            difference = _backbone_difference(manifest, head_config)
            if not difference:
                from embedpipe.embed.runtime import resolve_device

                device = resolve_device(config.device)
                return ProjectedEncoder(source, directory, embeddings, device)
            log.info(
                "%s: not projecting %s (%s); the images go through the backbone",
                source.weights,
                embeddings.embeddings,
                difference,
            )
    return ModelEncoder(source, config, images_uri, models)
