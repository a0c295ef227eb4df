"""What evaluate checks before any model is loaded: every source can be opened, and
every setting the user gave (its value differs from the default) finds what it names in
the data, whichever tasks run: an invalid setting is an error, never a silent skip.
"""

from __future__ import annotations

import os
from typing import Any

from embedpipe.config.evaluate import EvaluateSettings
from embedpipe.core import datasets, storage
from embedpipe.core.schemas import EMBEDDINGS_KIND, TEXT_EMBEDDINGS_KIND
from embedpipe.evaluate.sources import (
    LOCAL_DIR,
    EmbeddingsSource,
    MissingGroundTruth,
    ModelSource,
)
from embedpipe.evaluate.truth import Truth


def given_settings(config: EvaluateSettings) -> set[str]:
    """The settings whose value is not the default: the ones the user chose."""
    fields = type(config).model_fields
    return {name for name, info in fields.items() if getattr(config, name) != info.default}


def check_given_settings(truth: Truth, config: EvaluateSettings) -> None:
    """Each given setting that names data (a column, a file) finds it."""
    given = given_settings(config)
    if "probe_label_column" in given:
        column = config.probe_label_column
        truth.need(f"probe_label_column {column!r}", column)
    if "label_column" in given and config.label_column != "auto":
        truth.need(f"label_column {config.label_column!r}", config.label_column)
    if "caption_column" in given and config.caption_column not in ("auto", "prompt"):
        truth.need(f"caption_column {config.caption_column!r}", config.caption_column)
    if config.class_map_file:
        try:
            mapping = storage.read_json(config.class_map_file)
        except Exception as error:  # missing, unreadable, not JSON
            reason = str(error).splitlines()[0] if str(error) else type(error).__name__
            raise MissingGroundTruth(
                f"class_map_file {config.class_map_file}: cannot be read ({reason})"
            ) from None
        if not isinstance(mapping, dict):
            raise MissingGroundTruth(
                f"class_map_file {config.class_map_file}: expected a JSON object "
                "{label: class name}"
            )
    for column in config.regression_columns:
        truth.numeric(column)
    if given & {"class_names", "class_map_file"}:
        truth.labels()  # the classes named must match the data's labels


def check_sources(
    sources: list, config: EvaluateSettings, models: dict[str, dict[str, Any]] | None
) -> None:
    """Every source opens (a dataset of the right kind, a model whose entry is known and
    whose weights files are whole) before the first is evaluated."""
    for source in sources:
        if isinstance(source, EmbeddingsSource):
            datasets.read_manifest(source.embeddings, EMBEDDINGS_KIND)
            if source.text_embeddings:
                datasets.read_manifest(source.text_embeddings, TEXT_EMBEDDINGS_KIND)
        elif isinstance(source, ModelSource):
            _check_model_source(source.weights, config, models)


def _check_model_source(
    weights: str, config: EvaluateSettings, models: dict[str, dict[str, Any]] | None
) -> None:
    from embedpipe.models.loading import RANDOM_WEIGHTS, checkpoint_entry, entry_for_weights
    from embedpipe.models.registry import ModelError, get_entry, load_registry
    from embedpipe.models.weights_files import check_weights_files

    if weights in load_registry(models):
        return
    if weights.startswith(LOCAL_DIR):
        entry_for_weights(weights)  # its open_clip_config.json, or a ModelError naming it
    elif weights.startswith("hf-hub:") or weights == RANDOM_WEIGHTS:
        pass
    elif not storage.is_s3(weights) and not os.path.exists(weights):
        raise ModelError(f"--weights {weights}: no such file or folder")
    elif checkpoint_entry(weights) is None:
        if not config.model:
            raise ModelError(
                f"--weights {weights}: not a registry entry, a checkpoint folder (no "
                "config.json) or a published model (local-dir:, hf-hub:); set "
                "[evaluate].model to the registry entry these weights belong to"
            )
        get_entry(config.model, models)
    if not weights.startswith("hf-hub:") and weights != RANDOM_WEIGHTS:
        check_weights_files(weights)
