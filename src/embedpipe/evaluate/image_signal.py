"""Evaluate an image_signal training (``[train] pairs = "image_signal"``): the untrained
towers (rebuilt from the training's settings and seed, as at step 0) and the trained
checkpoint side by side, on the held-out rows of the training's splits.

Per model: ``image_to_signal_recall@K`` and ``signal_to_image_recall@K`` among the
held-out images (``cross_modal.retrieval_recall``), and ``<target>_r2`` for each scalar
target of the images dataset, per embedding source (image, signal, both) and probe (kNN,
Ridge), fit on the training rows (``cross_modal.regression_r2``).
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pyarrow as pa
import torch
import torch.nn.functional as F

from embedpipe.config import EvaluateSettings, TrainSettings
from embedpipe.core import datasets, storage
from embedpipe.core.finite import check_embeddings
from embedpipe.core.schemas import EVALUATION_KIND, IMAGES_KIND
from embedpipe.evaluate.cross_modal import regression_r2, retrieval_recall, with_both
from embedpipe.evaluate.metrics import knn_distances
from embedpipe.evaluate.sources import MissingGroundTruth
from embedpipe.models.identity import weights_identity
from embedpipe.models.precision import INFERENCE, Precision, precision_for
from embedpipe.models.two_towers import (
    FINETUNE_MODE,
    image_mode,
    load_finetuned_tower,
    load_image_head,
    load_signal_encoder,
)
from embedpipe.train.data import load_examples
from embedpipe.train.pairs_signal import IMAGE_SIGNAL_KIND, object_codes
from embedpipe.train.signal_towers import untrained_task


def scalar_targets(images_uri: str, image_ids: list[str]) -> dict[str, np.ndarray]:
    """Each scalar target column of the images dataset, per example row (NaN: unknown)."""
    columns = datasets.read_manifest(images_uri, IMAGES_KIND).get("signals", {}).get("columns", {})
    names = [name for name, spec in columns.items() if spec.get("kind") == "scalar"]
    if not names:
        return {}
    table = datasets.read_table(images_uri, IMAGES_KIND, ["image_id", *names])
    position = {}
    for index, image_id in enumerate(table.column("image_id").to_pylist()):
        position.setdefault(image_id, index)
    rows = [position[image_id] for image_id in image_ids]
    targets = {}
    for name in names:
        values = table.column(name).to_numpy(zero_copy_only=False).astype(np.float64)
        targets[name] = values[rows]
    return targets


class TrainedTowers:
    """A checkpoint's image tower (a head taking raw frozen embeddings, or a fine-tuned
    open_clip visual tower taking pixels) and signal encoder."""

    def __init__(self, directory: str):
        config = json.loads(Path(directory, "config.json").read_text())
        if config.get("kind") != IMAGE_SIGNAL_KIND:
            raise ValueError(f"{directory}: not an image_signal checkpoint")
        if image_mode(config, directory) == FINETUNE_MODE:  # pixels in
            self.head = load_finetuned_tower(directory, config, directory, "cpu").module.visual
        else:  # raw frozen embeddings in
            self.head, _ = load_image_head(directory, config)
        _, self.encoder = load_signal_encoder(directory, config)
        self.head.eval()
        self.encoder.eval()
        self.config = config

    def placed(self, device: torch.device, precision: Precision) -> TrainedTowers:
        """On ``device`` with the weights ``precision`` asks for."""
        self.head = precision.cast(self.head.to(device))
        self.encoder = precision.cast(self.encoder.to(device))
        return self

    def image(self, vectors: torch.Tensor) -> torch.Tensor:
        return F.normalize(self.head(vectors).float(), dim=-1)

    def signal(self, values: torch.Tensor, lengths: torch.Tensor) -> torch.Tensor:
        return F.normalize(self.encoder(values, lengths).float(), dim=-1)


def anomaly_neighbours(config: EvaluateSettings, held_out: np.ndarray) -> int:
    """``anomaly_neighbors``, or every other held-out image when there are fewer."""
    return min(config.anomaly_neighbors, int(held_out.sum()) - 1)


def carried_entries(config: dict) -> dict[str, dict]:
    """The signal encoder's entry the checkpoint carries, as ``[models.NAME]`` tables."""
    entry = dict(config["signal"]["entry"])
    return {entry.pop("name"): entry}


@torch.no_grad()
def _embed_both(
    models: dict, task, rows: np.ndarray, batch: int, precision: Precision, device: torch.device
) -> dict[str, tuple[np.ndarray, np.ndarray]]:
    """Each model's (image, signal) embeddings of ``rows``: every chunk's inputs (decoded
    pixels or frozen embeddings, padded signals) made once and fed to both models."""
    from embedpipe.embed.signals import padded_batch

    dtype = precision.weights
    out: dict[str, tuple[list, list]] = {name: ([], []) for name in models}
    chunks = [rows[start : start + batch].tolist() for start in range(0, len(rows), batch)]
    for chunk, inputs in task.input_batches(chunks):  # one loader over every chunk
        values, lengths = padded_batch(task.signals, chunk.tolist())
        inputs = inputs.to(device)
        inputs = inputs.to(dtype) if inputs.is_floating_point() else inputs
        values, lengths = values.to(device, dtype), lengths.to(device)
        for name, towers in models.items():
            with precision.autocasting(device):
                out[name][0].append(towers.image(inputs).float().cpu())
                out[name][1].append(towers.signal(values, lengths).float().cpu())
    return {
        name: (torch.cat(images).numpy(), torch.cat(signals).numpy())
        for name, (images, signals) in out.items()
    }


@dataclass
class TowersRun:
    """One model's results: flat metrics (recalls, anomaly means), R² per embedding source
    and probe, the rows' vectors per modality, probe predictions and anomaly scores."""

    name: str
    metrics: dict[str, float]
    regression: dict[str, dict[str, dict[str, float]]]
    vectors: dict[str, np.ndarray]
    predictions: dict[tuple[str, str, str], np.ndarray]
    anomaly: dict[str, np.ndarray]


@dataclass
class SignalEvaluation:
    """The evaluated rows (training rows fit the probes, held-out rows are scored) and
    the untrained and trained runs on them."""

    signal_column: str
    image_ids: list[str]
    categories: list[str]
    concepts: list[str]
    held_out: np.ndarray
    targets: dict[str, np.ndarray]
    runs: list[TowersRun]


def _selected(select_uri: str, examples) -> np.ndarray:
    usable = np.isin(examples.split, ("train", "val"))
    if select_uri:
        kept = set(datasets.read_table(select_uri, columns=["image_id"])["image_id"].to_pylist())
        usable &= np.array([image_id in kept for image_id in examples.image_ids], dtype=bool)
    return np.flatnonzero(usable)


def evaluate_image_signal(
    images_uri: str,
    checkpoint_uri: str,
    splits_uri: str,
    config: EvaluateSettings | None = None,
    select_uri: str = "",
    embeddings_uri: str = "",
) -> SignalEvaluation:
    """The untrained towers (rebuilt from the training's settings and seed) and the
    trained ones, on the held-out (val) rows of ``splits_uri`` (those of ``select_uri``
    only, when given); probes fit on its training rows. A head's image tower reads the
    frozen embeddings of ``embeddings_uri`` (default: those the training recorded), on
    ``[evaluate].device`` with its precision and batch size."""
    from embedpipe.embed.runtime import resolve_device

    config = config or EvaluateSettings()
    device = resolve_device(config.device)
    precision = precision_for(config.precision, device, INFERENCE)
    trained = TrainedTowers(checkpoint_uri).placed(device, precision)
    train_config = TrainSettings(**trained.config["train"])
    examples = load_examples(images_uri, train_config, splits_uri)
    recorded = trained.config
    if embeddings_uri and image_mode(recorded, checkpoint_uri) != FINETUNE_MODE:
        recorded = {**recorded, "image": {**recorded["image"], "embeddings": embeddings_uri}}
    # a config file's signal encoder travels in the checkpoint: no config file needed
    untrained = untrained_task(
        recorded, train_config, examples, images_uri, device, carried_entries(recorded)
    )
    precision.cast(untrained.module.eval())
    rows = _selected(select_uri, examples)
    held_out = examples.split[rows] == "val"
    if held_out.sum() < 2:
        raise MissingGroundTruth(
            f"{splits_uri}: fewer than two held-out images with a usable signal to evaluate"
        )
    objects = object_codes(examples, rows)
    targets = {
        name: values[rows]
        for name, values in scalar_targets(images_uri, examples.image_ids).items()
    }
    runs = []
    towers = {"untrained": untrained.module, "trained": trained}
    embedded = _embed_both(towers, untrained, rows, config.batch_size, precision, device)
    for name, (image, signal) in embedded.items():
        check_embeddings(torch.from_numpy(image), f"{name} image tower", checkpoint_uri)
        check_embeddings(torch.from_numpy(signal), f"{name} signal tower", checkpoint_uri)
        metrics = retrieval_recall(
            torch.from_numpy(image[held_out]),
            torch.from_numpy(signal[held_out]),
            config.recall_k,
            objects[held_out],
        )
        predictions: dict = {}
        regression = regression_r2(
            with_both(image, signal),
            targets,
            ~held_out,
            held_out,
            config.regression_neighbors,
            config.regression_alpha,
            predictions,
        )
        anomaly = {}
        for modality, vectors in (("image", image), ("signal", signal)):
            scores = np.full(len(rows), np.nan)
            neighbours = anomaly_neighbours(config, held_out)
            scores[held_out] = knn_distances(torch.from_numpy(vectors[held_out]), neighbours)
            anomaly[modality] = scores
            metrics[f"{modality}_anomaly_knn_distance"] = float(np.nanmean(scores))
        metrics["held_out_images"] = int(held_out.sum())
        runs.append(
            TowersRun(
                name,
                metrics,
                regression,
                {"image": image, "signal": signal},
                predictions,
                anomaly,
            )
        )
    return SignalEvaluation(
        train_config.signal_column,
        [examples.image_ids[row] for row in rows.tolist()],
        [examples.categories[row] for row in rows.tolist()],
        [examples.concepts[row] for row in rows.tolist()],
        held_out,
        targets,
        runs,
    )


def check_baselines(checkpoint: str, sources: list) -> str:
    """Beside an image_signal checkpoint, only the embeddings its image tower started
    from may be given (the end-to-end pipeline's baseline): the towers of a head read
    them (returned; "" when none is given), the untrained ones rebuilt from the
    checkpoint's settings."""
    from embedpipe.evaluate.sources import EmbeddingsSource

    config = json.loads(Path(checkpoint, "config.json").read_text())
    given = ""
    if image_mode(config, checkpoint) == FINETUNE_MODE:  # the tower is the model it fine-tunes
        backbone = config["image"]["entry"]["name"]
    else:
        backbone = config["image"]["backbone"]["entry"]["name"]
    for source in sources:
        if getattr(source, "weights", "") == checkpoint:
            continue
        if not isinstance(source, EmbeddingsSource):
            raise MissingGroundTruth(
                f"evaluate: give the image_signal checkpoint {checkpoint} on its own or "
                "beside the embeddings its image tower started from"
            )
        made_by = datasets.read_manifest(source.embeddings).get("model")
        if made_by != backbone:
            raise MissingGroundTruth(
                f"--embeddings {source.embeddings}: made by {made_by}, but the image tower "
                f"of {checkpoint} starts from {backbone}'s embeddings"
            )
        given = source.embeddings
    return given


def image_signal_checkpoints(sources: list) -> list[str]:
    """The ``--weights`` sources that are image_signal checkpoints (local folders)."""
    found = []
    for source in sources:
        weights = getattr(source, "weights", "")
        config = Path(weights, "config.json") if weights else None
        if (
            config
            and config.is_file()
            and json.loads(config.read_text()).get("kind") == IMAGE_SIGNAL_KIND
        ):
            found.append(weights)
    return found


def flat_metrics(run: TowersRun) -> dict[str, float]:
    """The metrics as one flat mapping (KFP metrics, the report's table): R² as
    ``<target>_r2 (<source>, <probe>)``."""
    flat = dict(run.metrics)
    for source, probes in run.regression.items():
        for probe, scores in probes.items():
            for name, value in scores.items():
                flat[f"{name} ({source}, {probe})"] = value
    return flat


def _results_table(evaluation: SignalEvaluation) -> pa.Table:
    """One row per model and evaluated image: its split, anomaly score per modality and
    the Ridge prediction of each target from each embedding source."""
    parts = []
    count = len(evaluation.image_ids)
    for run in evaluation.runs:
        columns = {
            "model": pa.array([run.name] * count, pa.string()),
            "image_id": pa.array(evaluation.image_ids, pa.string()),
            "category": pa.array(evaluation.categories, pa.string()),
            "concept": pa.array(evaluation.concepts, pa.string()),
            "split": pa.array(np.where(evaluation.held_out, "val", "train"), pa.string()),
        }
        for modality, scores in run.anomaly.items():
            columns[f"{modality}_anomaly_knn_distance"] = pa.array(
                scores, pa.float64(), mask=np.isnan(scores)
            )
        for (source, probe, target), values in sorted(run.predictions.items()):
            if probe == "ridge":
                columns[f"{target}_predicted_{source}"] = pa.array(
                    values, pa.float64(), mask=np.isnan(values)
                )
        parts.append(pa.table(columns))
    return pa.concat_tables(parts)


def write_evaluation(
    checkpoint: str,
    metadata_uri: str,
    out_uri: str,
    images_uri: str,
    config: EvaluateSettings,
    select_uri: str = "",
    embeddings_uri: str = "",
) -> dict[str, dict[str, float]]:
    """Evaluate one image_signal checkpoint (``metadata_uri``: the splits it trained with)
    and write ``metrics.json`` (per model: ``metrics`` with the retrieval recalls,
    ``regression`` with ``<target>_r2`` per embedding source and probe), the report, and
    a results table, the untrained and trained towers side by side."""
    from embedpipe.evaluate.signal_report import render_signal_report
    from embedpipe.evaluate.stage import CONFUSION_NAME, METRICS_NAME, REPORT_NAME

    evaluation = evaluate_image_signal(
        images_uri, checkpoint, metadata_uri, config, select_uri, embeddings_uri
    )
    identity = weights_identity(checkpoint)
    payload = {
        "models": [
            {
                "model": run.name,
                "source": checkpoint,
                "metrics": run.metrics,
                "regression": run.regression,
                "skipped": {},
            }
            # publish picks the trained towers' entry by the checkpoint's identity
            | ({"identity": identity} if run.name == "trained" and identity else {})
            for run in evaluation.runs
        ],
        "metadata": metadata_uri,
        "kind": IMAGE_SIGNAL_KIND,
    }
    storage.write_json(datasets.side_path(out_uri, METRICS_NAME), payload)
    storage.write_json(datasets.side_path(out_uri, CONFUSION_NAME), {})
    report = render_signal_report(evaluation, config, images_uri, metadata_uri)
    storage.write_bytes(datasets.side_path(out_uri, REPORT_NAME), report.encode("utf-8"))
    datasets.save_config(out_uri, "evaluate", config)
    datasets.write_table(
        out_uri,
        _results_table(evaluation),
        EVALUATION_KIND,
        extra={"models": [run.name for run in evaluation.runs], "metadata": metadata_uri},
    )
    return {run.name: flat_metrics(run) for run in evaluation.runs}
