"""``embed --dim N``: the first N dimensions of the full embedding, renormalised, with N
recorded in the schema metadata and the manifest."""

import json

import numpy as np
import pytest
import torch

from embedpipe.cli import main
from embedpipe.config import EmbedSettings
from embedpipe.core import datasets
from embedpipe.embed.images import embed_images
from embedpipe.models.loading import load_model, save_model


@pytest.fixture(scope="module")
def tiny_checkpoint(tiny_entry, tmp_path_factory):
    torch.manual_seed(0)
    path = tmp_path_factory.mktemp("tiny-prefix") / "ckpt"
    save_model(load_model(tiny_entry, "random"), str(path))
    return str(path)


def vectors(uri: str) -> np.ndarray:
    table = datasets.read_table(uri, "embeddings")
    return np.stack(table.column("embedding").to_numpy(zero_copy_only=False))


@pytest.mark.parametrize("normalize", [True, False])
def test_a_prefix_is_the_renormalised_start_of_the_full_embedding(
    demo_images, tiny_entry, tiny_checkpoint, tmp_path, normalize
):
    common = dict(weights=tiny_checkpoint, batch_size=32, num_workers=0, normalize=normalize)
    full = embed_images(demo_images, str(tmp_path / "full"), EmbedSettings(**common), tiny_entry)
    cut = embed_images(
        demo_images, str(tmp_path / "cut"), EmbedSettings(**common, dim=16), tiny_entry
    )
    assert (full.dim, cut.dim) == (64, 16)
    expected = vectors(full.out_uri)[:, :16]
    if normalize:
        expected = expected / np.linalg.norm(expected, axis=1, keepdims=True)
    np.testing.assert_allclose(vectors(cut.out_uri), expected, rtol=1e-5, atol=1e-6)
    table = datasets.read_table(cut.out_uri, "embeddings")
    assert table.schema.field("embedding").type.list_size == 16
    assert table.schema.metadata[b"embedpipe.dim"] == b"16"
    manifest = json.loads((tmp_path / "cut" / ".embedpipe" / "manifest.json").read_text())
    assert manifest["dim"] == 16 and manifest["model"] == "tiny"


def test_a_prefix_longer_than_the_embedding_is_a_one_line_error(
    demo_images, tiny_checkpoint, tmp_path, capsys, tiny_entry
):
    argv = ["embed", demo_images, "--weights", tiny_checkpoint, "--out", str(tmp_path / "e")]
    assert main([*argv, "--dim", "65", "--device", "cpu", "--num-workers", "0"]) != 0
    error = capsys.readouterr().err.strip().splitlines()
    assert error[-1].endswith("dim: 65 is larger than the embedding dimension 64 of tiny")
