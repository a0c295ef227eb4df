"""recall@K per prefix for a model trained with nested_dims: the numbers of the same
evaluation on the truncated, renormalised vectors, under ``_dimN`` names."""

import json

import numpy as np
import pytest
from test_evaluate import (
    Planted,
    _brute_force_image_retrieval,
    _settings,
    _vectors_table,
)

from embedpipe.core import datasets, storage
from embedpipe.evaluate.nested import trained_nested_dims
from embedpipe.evaluate.sources import EmbeddingsSource
from embedpipe.evaluate.stage import evaluate_models

TASKS = ("retrieval", "image_retrieval")


def made_by(embeddings_uri: str, checkpoint, nested_dims) -> None:
    """Record in the embeddings' manifest the checkpoint that made them, as embed does."""
    checkpoint.mkdir()
    (checkpoint / "config.json").write_text(
        json.dumps({"kind": "head", "train": {"nested_dims": nested_dims}})
    )
    manifest = datasets.read_manifest(embeddings_uri)
    manifest["weights"] = str(checkpoint)
    storage.write_json(datasets.side_path(embeddings_uri, datasets.MANIFEST_NAME), manifest)


def cut(vectors: np.ndarray, dim: int) -> np.ndarray:
    part = vectors[:, :dim]
    return (part / np.linalg.norm(part, axis=1, keepdims=True)).astype(np.float32)


def test_each_prefix_reports_the_recall_of_its_truncated_vectors(tmp_path):
    planted = Planted(tmp_path, noise=2.0)
    made_by(planted.emb_uri, tmp_path / "ckpt", [4, 8])
    assert trained_nested_dims(planted.emb_uri) == (4, 8)
    result = evaluate_models(
        [planted.source()], planted.meta_uri, str(tmp_path / "out"), _settings(tasks=TASKS)
    )
    (ours,) = result.model_metrics.values()
    meta = planted.metadata
    for dim in (4, 8):
        emb, texts = str(tmp_path / f"emb{dim}"), str(tmp_path / f"texts{dim}")
        datasets.write_table(
            emb,
            _vectors_table("image_id", planted.ids, cut(planted.image_vectors, dim)),
            "embeddings",
        )
        datasets.write_table(
            texts,
            _vectors_table("text", planted.texts, cut(planted.text_vectors, dim)),
            "text-embeddings",
        )
        alone = evaluate_models(
            [EmbeddingsSource(emb, texts)],
            planted.meta_uri,
            str(tmp_path / f"out{dim}"),
            _settings(tasks=TASKS),
        )
        (theirs,) = alone.model_metrics.values()
        recalls = [name for name in theirs if "recall@" in name]
        assert len(recalls) == 9  # image->image, text->image, image->text at K = 1, 5, 10
        for name in recalls:
            assert ours[f"{name}_dim{dim}"] == theirs[name], name
        brute = _brute_force_image_retrieval(
            planted.image_vectors[:, :dim],
            np.array(meta.column("category").to_pylist()),
            np.array(meta.column("concept").to_pylist()),
            np.array(meta.column("split").to_pylist()) == "val",
            (1, 5, 10),
        )
        assert ours[f"image_image_recall@1_dim{dim}"] == pytest.approx(
            brute["image_image_recall@1"], abs=1e-6
        )
    assert ours["image_image_recall@1_dim4"] < ours["image_image_recall@1"]


def test_a_model_trained_without_nested_dims_reports_no_prefixes(tmp_path):
    planted = Planted(tmp_path)
    made_by(planted.emb_uri, tmp_path / "ckpt", [])
    result = evaluate_models(
        [planted.source()], planted.meta_uri, str(tmp_path / "out"), _settings(tasks=TASKS)
    )
    (ours,) = result.model_metrics.values()
    assert not [name for name in ours if "_dim" in name]
    assert trained_nested_dims("clip_vitb32") == () == trained_nested_dims("random")
