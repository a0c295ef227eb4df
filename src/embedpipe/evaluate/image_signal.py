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
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from safetensors.torch import load_file

from embedpipe.config import TrainSettings
from embedpipe.core import datasets
from embedpipe.core.schemas import IMAGES_KIND
from embedpipe.evaluate.cross_modal import regression_r2, retrieval_recall, with_both
from embedpipe.train.checkpoint import WEIGHTS_NAME
from embedpipe.train.data import load_examples
from embedpipe.train.pairs_signal import IMAGE_SIGNAL_KIND, ImageSignalTask
from embedpipe.train.signal_towers import image_tower, signal_tower, untrained_task


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
        weights = load_file(str(Path(directory, WEIGHTS_NAME)))
        self.head = image_tower(config, weights)
        self.encoder = signal_tower(config, weights)
        self.head.eval()
        self.encoder.eval()
        self.config = config

    def image(self, vectors: torch.Tensor) -> torch.Tensor:
        return F.normalize(self.head(vectors).float(), dim=-1)

    def signal(self, values: torch.Tensor, lengths: torch.Tensor) -> torch.Tensor:
        return F.normalize(self.encoder(values, lengths).float(), dim=-1)


@torch.no_grad()
def _embed(towers, task: ImageSignalTask, rows: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    from embedpipe.embed.signals import padded_batch

    images, signals = [], []
    for start in range(0, len(rows), 256):
        chunk = [int(r) for r in rows[start : start + 256]]
        values, lengths = padded_batch(task.signals, chunk)
        images.append(towers.image(task.image_inputs(chunk)))
        signals.append(towers.signal(values, lengths))
    return torch.cat(images).numpy(), torch.cat(signals).numpy()


def evaluate_image_signal(
    images_uri: str,
    checkpoint_uri: str,
    splits_uri: str,
    ks: tuple[int, ...] = (1, 5),
    neighbours: int = 10,
    alpha: float = 1.0,
) -> dict[str, dict]:
    """``{"untrained": metrics, "trained": metrics}`` on the held-out (val) rows."""
    trained = TrainedTowers(checkpoint_uri)
    config = TrainSettings(**trained.config["train"])
    examples = load_examples(images_uri, config, splits_uri)
    untrained = untrained_task(trained.config, config, examples, images_uri)
    untrained.module.eval()
    usable = np.flatnonzero(np.isin(examples.split, ("train", "val")))
    held_out = examples.split[usable] == "val"
    targets = {
        name: values[usable]
        for name, values in scalar_targets(images_uri, examples.image_ids).items()
    }
    results = {}
    for name, towers in (("untrained", untrained.module), ("trained", trained)):
        image, signal = _embed(towers, untrained, usable)
        metrics = retrieval_recall(
            torch.from_numpy(image[held_out]), torch.from_numpy(signal[held_out]), ks
        )
        metrics["regression"] = regression_r2(
            with_both(image, signal), targets, ~held_out, held_out, neighbours, alpha
        )
        metrics["held_out_images"] = int(held_out.sum())
        results[name] = metrics
    return results


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


def flat_metrics(metrics: dict) -> dict[str, float]:
    """Retrieval recalls as they are, R² as ``<source>_<probe>_<target>_r2``."""
    flat = {key: value for key, value in metrics.items() if key != "regression"}
    for source, probes in metrics["regression"].items():
        for probe, scores in probes.items():
            for name, value in scores.items():
                flat[f"{source}_{probe}_{name}"] = value
    return flat


def write_evaluation(
    checkpoint: str, metadata_uri: str, out_uri: str, images_uri: str, config
) -> dict[str, dict[str, float]]:
    """Evaluate one image_signal checkpoint (``metadata_uri``: the splits it trained with)
    and write ``metrics.json`` with the untrained and trained towers side by side."""
    from embedpipe.core import storage
    from embedpipe.evaluate.stage import METRICS_NAME

    results = evaluate_image_signal(images_uri, checkpoint, metadata_uri, config.recall_k)
    models = {name: flat_metrics(metrics) for name, metrics in results.items()}
    payload = {
        "models": [
            {"model": name, "source": checkpoint, "metrics": values, "skipped": {}}
            for name, values in models.items()
        ],
        "metadata": metadata_uri,
        "kind": IMAGE_SIGNAL_KIND,
    }
    storage.write_json(datasets.side_path(out_uri, METRICS_NAME), payload)
    datasets.save_config(out_uri, "evaluate", config)
    return models
