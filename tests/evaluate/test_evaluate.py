"""evaluate against independent oracles: clip_benchmark for zero-shot and image-text
retrieval, scikit-learn for probes and anomaly scores, numpy brute force for
image->image retrieval. Embeddings are planted (class centroids plus noise), so the
metrics are far from chance and from 1."""

import json
import math
import os

import numpy as np
import pyarrow as pa
import pytest
import torch
from clip_benchmark.metrics import zeroshot_classification, zeroshot_retrieval

from embedpipe.cli import main
from embedpipe.config import EvaluateSettings
from embedpipe.core import datasets
from embedpipe.evaluate import metrics as m
from embedpipe.evaluate.sources import EmbeddingsSource, MissingGroundTruth, ModelSource
from embedpipe.evaluate.stage import evaluate_models

DIM = 24
TEMPLATES = ("a photo of a {c}.", "a drawing of a {c}.", "itap of a {c}.")
CATEGORIES = ("shape", "fruit", "tool")
CONCEPTS_PER_CATEGORY = 4
IMAGES_PER_CONCEPT = 9


def _fixed_accuracy(output, target, topk=(1,)):
    """clip_benchmark's accuracy() with its 1-element array -> float conversion that
    numpy 2.4 refuses written as .item(); the arithmetic is the same."""
    pred = output.topk(max(topk), 1, True, True)[1].t()
    correct = pred.eq(target.view(1, -1).expand_as(pred))
    return [float(correct[:k].reshape(-1).float().sum().item()) / len(target) for k in topk]


@pytest.fixture(autouse=True)
def _patch_clip_benchmark(monkeypatch):
    monkeypatch.setattr(zeroshot_classification, "accuracy", _fixed_accuracy)


class Planted:
    """Metadata, image embeddings and text embeddings with known structure."""

    def __init__(self, tmp_path, seed=0, noise=2.0):
        rng = np.random.default_rng(seed)
        self.concepts, rows = [], []
        for category in CATEGORIES:
            for k in range(CONCEPTS_PER_CATEGORY):
                concept = f"{category}-{k}"
                self.concepts.append(concept)
                for i in range(IMAGES_PER_CONCEPT):
                    split = "val" if k == 0 else ("train" if i % 3 else "val")
                    rows.append((f"{concept}-{i}", category, concept, split))
        centre = {c: rng.normal(size=DIM) for c in self.concepts}
        self.ids = [r[0] for r in rows]
        self.image_vectors = np.stack(
            [centre[r[2]] + noise * rng.normal(size=DIM) for r in rows]
        ).astype(np.float32)
        self.captions = [
            [f"{r[0]} caption {j}" for j in range(1 + i % 2)] for i, r in enumerate(rows)
        ]
        texts, vectors = [], []
        for concept in self.concepts:
            for template in TEMPLATES:
                texts.append(template.format(c=concept))
                vectors.append(centre[concept] + 0.5 * rng.normal(size=DIM))
        for row, captions in enumerate(self.captions):
            for caption in captions:
                texts.append(caption)
                vectors.append(self.image_vectors[row] + 1.3 * noise * rng.normal(size=DIM))
        self.texts, self.text_vectors = texts, np.stack(vectors).astype(np.float32)
        self.text_index = {t: k for k, t in enumerate(texts)}
        self.weight = rng.normal(size=DIM)
        self.metadata = pa.table(
            {
                "image_id": self.ids,
                "category": [r[1] for r in rows],
                "concept": [r[2] for r in rows],
                "split": [r[3] for r in rows],
                "captions": self.captions,
                "size_cm": (self.image_vectors @ self.weight + 0.3 * rng.normal(size=len(rows))),
            }
        )
        self.meta_uri = str(tmp_path / "meta")
        self.emb_uri = str(tmp_path / "emb")
        self.text_uri = str(tmp_path / "texts")
        datasets.write_table(self.meta_uri, self.metadata, "selection")
        datasets.write_table(
            self.emb_uri, _vectors_table("image_id", self.ids, self.image_vectors), "embeddings"
        )
        datasets.write_table(
            self.text_uri, _vectors_table("text", texts, self.text_vectors), "text-embeddings"
        )

    def source(self):
        return EmbeddingsSource(self.emb_uri, self.text_uri)


def _side_text(path: str) -> str:
    with open(path, encoding="utf-8") as handle:
        return handle.read()


def _vectors_table(key, keys, vectors):
    flat = pa.array(vectors.reshape(-1), pa.float32())
    return pa.table(
        {key: keys, "embedding": pa.FixedSizeListArray.from_arrays(flat, vectors.shape[1])}
    )


class LookupModel:
    """What clip_benchmark calls: encode_image on the dataloader's items (row numbers here)
    and encode_text on the tokenizer's output (text numbers here)."""

    def __init__(self, planted: Planted):
        self.images = torch.from_numpy(planted.image_vectors)
        self.texts = torch.from_numpy(planted.text_vectors)
        self.index = planted.text_index

    def tokenizer(self, texts):
        return torch.tensor([self.index[t] for t in texts])

    def encode_image(self, rows):
        return self.images[rows]

    def encode_text(self, numbers):
        return self.texts[numbers]


class Rows(torch.utils.data.Dataset):
    def __init__(self, items, classes=None):
        self.items, self.classes = items, classes

    def __len__(self):
        return len(self.items)

    def __getitem__(self, k):
        return self.items[k]


def _collate_captions(batch):
    return torch.tensor([row for row, _ in batch]), [captions for _, captions in batch]


def _settings(**values):
    return EvaluateSettings(
        **{"device": "cpu", "templates": TEMPLATES, "recall_k": (1, 5, 10), **values}
    )


def test_zeroshot_and_retrieval_match_clip_benchmark(tmp_path):
    planted = Planted(tmp_path)
    model = LookupModel(planted)
    targets = [planted.concepts.index(c) for c in planted.metadata.column("concept").to_pylist()]
    loader = torch.utils.data.DataLoader(
        Rows(list(zip(range(len(targets)), targets, strict=True)), planted.concepts),
        batch_size=16,
    )
    theirs = zeroshot_classification.evaluate(
        model, loader, model.tokenizer, planted.concepts, list(TEMPLATES), "cpu", amp=False
    )
    loader = torch.utils.data.DataLoader(
        Rows(list(enumerate(planted.captions))), batch_size=16, collate_fn=_collate_captions
    )
    theirs |= zeroshot_retrieval.evaluate(
        model, loader, model.tokenizer, "cpu", amp=False, recall_k_list=[1, 5, 10]
    )

    result = evaluate_models(
        [planted.source()],
        planted.meta_uri,
        str(tmp_path / "out"),
        _settings(tasks=("zeroshot", "retrieval")),
    )
    (ours,) = result.model_metrics.values()
    assert set(theirs) <= set(ours)
    for name, value in theirs.items():
        assert ours[name] == pytest.approx(value, abs=1e-6), name  # theirs: float32 means
    # planted, so neither chance nor perfect: the comparison means something
    assert 0.2 < ours["acc1"] < 0.98
    assert 0.1 < ours["image_retrieval_recall@1"] < 0.98
    assert 0.1 < ours["text_retrieval_recall@1"] < 0.98

    written = json.loads(_side_text(datasets.side_path(result.out_uri, "metrics.json")))
    assert written["models"][0]["metrics"] == ours
    confusion = json.loads(_side_text(datasets.side_path(result.out_uri, "confusion_matrix.json")))
    (matrix,) = confusion.values()
    assert matrix["labels"] == sorted(planted.concepts)
    assert np.trace(np.array(matrix["matrix"])) / len(targets) == pytest.approx(ours["acc1"])


def test_under_five_classes_acc5_is_nan_as_in_clip_benchmark_and_null_in_json(tmp_path):
    planted = Planted(tmp_path)
    keep = [c.startswith("shape") for c in planted.metadata.column("concept").to_pylist()]
    datasets.write_table(planted.meta_uri, planted.metadata.filter(pa.array(keep)), "selection")
    result = evaluate_models(
        [planted.source()], planted.meta_uri, str(tmp_path / "out"), _settings(tasks=("zeroshot",))
    )
    (ours,) = result.model_metrics.values()
    assert ours["acc5"] is None and 0 < ours["acc1"] <= 1


def _brute_force_image_retrieval(vectors, categories, concepts, queries, ks):
    vectors = vectors / np.linalg.norm(vectors, axis=1, keepdims=True)
    firsts, aps = [], []
    for q in np.flatnonzero(queries):
        gallery = [g for g in range(len(vectors)) if g != q and categories[g] == categories[q]]
        scores = vectors[gallery] @ vectors[q]
        ranked = np.array(gallery)[np.argsort(-scores, kind="stable")]
        hits = concepts[ranked] == concepts[q]
        if not hits.any():
            continue
        firsts.append(np.argmax(hits))
        precision = np.cumsum(hits) / np.arange(1, len(hits) + 1)
        aps.append(precision[hits].mean())
    firsts = np.array(firsts)
    return {f"image_image_recall@{k}": float((firsts < k).mean()) for k in ks} | {
        "image_image_map": float(np.mean(aps))
    }


def test_image_to_image_retrieval_per_category_matches_brute_force(tmp_path):
    planted = Planted(tmp_path, noise=2.5)
    result = evaluate_models(
        [planted.source()],
        planted.meta_uri,
        str(tmp_path / "out"),
        _settings(tasks=("image_retrieval",)),
    )
    (ours,) = result.model_metrics.values()
    meta = planted.metadata
    expected = _brute_force_image_retrieval(
        planted.image_vectors,
        np.array(meta.column("category").to_pylist()),
        np.array(meta.column("concept").to_pylist()),
        np.array(meta.column("split").to_pylist()) == "val",
        (1, 5, 10),
    )
    for name, value in expected.items():
        assert ours[name] == pytest.approx(value, abs=1e-6), name  # theirs: float32 means
    assert 0.2 < ours["image_image_recall@1"] < 1
    rows = datasets.read_table(result.out_uri, "evaluation")
    queries = rows.filter(pa.compute.equal(rows.column("split"), "val"))
    assert queries.column("image_image_first_hit").null_count == 0


def test_probes_and_anomaly_scores_match_scikit_learn(tmp_path):
    from sklearn.ensemble import IsolationForest
    from sklearn.linear_model import LogisticRegression, Ridge
    from sklearn.metrics import r2_score
    from sklearn.neighbors import NearestNeighbors

    planted = Planted(tmp_path)
    config = _settings(
        tasks=("linear_probe", "regression_probe", "anomaly"),
        regression_columns=("size_cm",),
        probe_label_column="category",
        anomaly_neighbors=4,
        anomaly_top=5,
    )
    result = evaluate_models([planted.source()], planted.meta_uri, str(tmp_path / "out"), config)
    (ours,) = result.model_metrics.values()

    x = planted.image_vectors / np.linalg.norm(planted.image_vectors, axis=1, keepdims=True)
    meta = planted.metadata.to_pydict()
    train = np.array(meta["split"]) == "train"
    test = ~train
    labels = np.array(meta["category"])
    probe = LogisticRegression(C=1.0, max_iter=1000, random_state=0).fit(x[train], labels[train])
    assert ours["linear_probe_acc1"] == pytest.approx(
        (probe.predict(x[test]) == labels[test]).mean()
    )
    values = np.array(meta["size_cm"])
    ridge = Ridge(alpha=1.0).fit(x[train], values[train])
    assert ours["regression_probe_r2_size_cm"] == pytest.approx(
        r2_score(values[test], ridge.predict(x[test])), abs=1e-6
    )
    assert ours["regression_probe_r2_size_cm"] > 0.3

    rows = datasets.read_table(result.out_uri, "evaluation").to_pydict()
    distances, _ = NearestNeighbors(n_neighbors=5).fit(x).kneighbors(x)
    np.testing.assert_allclose(rows["anomaly_knn_distance"], distances[:, 1:].mean(1), atol=1e-5)
    forest = IsolationForest(n_estimators=100, random_state=0).fit(x)
    np.testing.assert_allclose(rows["anomaly_isolation_score"], -forest.score_samples(x), atol=1e-6)
    report = _side_text(datasets.side_path(result.out_uri, "report.html"))
    assert "Most anomalous images" in report and "data:image/png;base64," in report


def test_a_planted_outlier_tops_both_anomaly_scores(tmp_path):
    """One tight blob around a direction and one image pointing the other way; the
    metadata needs nothing but image ids for this task."""
    rng = np.random.default_rng(4)
    direction = rng.normal(size=DIM)
    vectors = (direction + 0.3 * rng.normal(size=(150, DIM))).astype(np.float32)
    vectors[42] = -direction
    ids = [f"img-{k}" for k in range(150)]
    datasets.write_table(str(tmp_path / "meta"), pa.table({"image_id": ids}), "selection")
    datasets.write_table(
        str(tmp_path / "emb"), _vectors_table("image_id", ids, vectors), "embeddings"
    )
    result = evaluate_models(
        [EmbeddingsSource(str(tmp_path / "emb"))],
        str(tmp_path / "meta"),
        str(tmp_path / "out"),
        _settings(tasks=("anomaly",)),
    )
    rows = datasets.read_table(result.out_uri, "evaluation").to_pydict()
    assert int(np.argmax(rows["anomaly_knn_distance"])) == 42
    assert int(np.argmax(rows["anomaly_isolation_score"])) == 42
    report = _side_text(datasets.side_path(result.out_uri, "report.html"))
    assert "No images dataset given" in report and "img-42" in report


def test_two_models_side_by_side_in_one_report(tmp_path):
    planted = Planted(tmp_path)
    worse = Planted(tmp_path / "worse", seed=0, noise=4.0)
    result = evaluate_models(
        [planted.source(), EmbeddingsSource(worse.emb_uri, worse.text_uri, name="noisier")],
        planted.meta_uri,
        str(tmp_path / "out"),
        _settings(),
    )
    assert len(result.models) == 2 and result.models[1] == "noisier"
    good, bad = result.model_metrics.values()
    assert good["acc1"] > bad["acc1"] and good["image_image_map"] > bad["image_image_map"]
    # auto tasks: the concept split makes no regression column, so that one is skipped
    assert any("regression probe" in reason for reason in result.skipped.values())
    rows = datasets.read_table(result.out_uri, "evaluation")
    assert rows.num_rows == 2 * len(planted.ids)
    assert set(rows.column("model").to_pylist()) == set(result.models)
    report = _side_text(datasets.side_path(result.out_uri, "report.html"))
    assert report.count("<th>noisier</th>") == 1 and "Recall@K" in report
    assert report.count("data:image/png;base64,") >= 5  # recall, 2 projections, 2 confusions


def test_bad_input_names_what_is_missing(tmp_path):
    planted = Planted(tmp_path)
    out = str(tmp_path / "out")
    source = planted.source()
    with pytest.raises(MissingGroundTruth, match=r"class names do not match.*'fruit-0'"):
        evaluate_models(
            [source],
            planted.meta_uri,
            out,
            _settings(tasks=("zeroshot",), class_names=("shape-0",)),
        )
    with pytest.raises(
        MissingGroundTruth, match="recall_k 40 is larger than the gallery of category"
    ):
        evaluate_models(
            [source],
            planted.meta_uri,
            out,
            _settings(tasks=("image_retrieval",)).model_copy(update={"recall_k": (1, 40)}),
        )
    no_captions = planted.metadata.drop_columns(["captions"])
    datasets.write_table(str(tmp_path / "nocap"), no_captions, "selection")
    with pytest.raises(MissingGroundTruth, match="no captions or caption column"):
        evaluate_models([source], str(tmp_path / "nocap"), out, _settings(tasks=("retrieval",)))
    with pytest.raises(MissingGroundTruth, match="without --text-embeddings"):
        evaluate_models(
            [EmbeddingsSource(planted.emb_uri)],
            planted.meta_uri,
            out,
            _settings(tasks=("zeroshot",)),
        )
    with pytest.raises(MissingGroundTruth, match=r"no embedding for 12 text.*a sketch of a"):
        evaluate_models(
            [source],
            planted.meta_uri,
            out,
            _settings(tasks=("zeroshot",), templates=("a sketch of a {c}.", *TEMPLATES)),
        )
    assert not os.path.exists(out)  # nothing half-written


def test_prompt_captions_retrieval_by_concept(tmp_path):
    planted = Planted(tmp_path)
    config = _settings(tasks=("retrieval",), caption_column="prompt", recall_k=(1, 5))
    (ours,) = evaluate_models(
        [planted.source()], planted.meta_uri, str(tmp_path / "o"), config
    ).model_metrics.values()
    # one distinct prompt per concept, every image of the concept its positive
    assert ours["image_retrieval_recall@1"] > 0.5
    assert 0 < ours["text_retrieval_recall@1"] <= 1


def test_ranks_agree_with_topk_on_random_scores():
    rng = np.random.default_rng(3)
    texts = m.as_tensor(rng.normal(size=(50, 8)), torch.device("cpu"))
    images = m.as_tensor(rng.normal(size=(30, 8)), torch.device("cpu"))
    owner = np.arange(50) % 30
    text_ranks, image_ranks = m.text_image_ranks(texts, images, np.arange(50), owner)
    scores = (texts @ images.T).numpy()
    for t in range(50):
        top = np.argsort(-scores[t])
        assert text_ranks[t] == int(np.flatnonzero(top == owner[t])[0])
    assert (image_ranks >= 0).all()
    assert math.isfinite(float(image_ranks.mean()))


# ---- models: the same path through a real open_clip model and the CLI ----


@pytest.fixture(scope="module")
def tiny_checkpoint(tiny_entry, tmp_path_factory):
    from embedpipe.models.loading import load_model, save_model

    path = tmp_path_factory.mktemp("eval-ckpt") / "ckpt"
    torch.manual_seed(0)
    save_model(load_model(tiny_entry, "random"), str(path))
    return str(path)


def test_a_checkpoint_evaluates_like_clip_benchmark_on_the_same_model(
    tiny_checkpoint, tiny_entry, demo_images, tmp_path
):
    """A random model is near chance, but the same model through clip_benchmark gives the
    same numbers: images decoded and transformed, prompts tokenised, all as open_clip does."""
    from embedpipe.models.loading import load_model

    out = tmp_path / "out"
    config = _settings(
        tasks=("zeroshot",), label_column="concept", templates=("a photo of a {c}.",)
    )
    result = evaluate_models([ModelSource(tiny_checkpoint)], demo_images, str(out), config)
    (ours,) = result.model_metrics.values()

    model = load_model(tiny_entry, tiny_checkpoint)
    meta = datasets.read_table(demo_images, "images", ["image_id", "image", "concept"])
    seen, items = set(), []
    classes = sorted(set(meta.column("concept").to_pylist()))
    from embedpipe.embed.pixels import decode

    for image_id, data, concept in zip(
        *(meta.column(c).to_pylist() for c in ("image_id", "image", "concept")), strict=True
    ):
        if image_id not in seen:
            seen.add(image_id)
            items.append((model.transform(decode(data, None)), classes.index(concept)))
    loader = torch.utils.data.DataLoader(Rows(items, classes), batch_size=32)
    theirs = zeroshot_classification.evaluate(
        model.module, loader, model.tokenizer(), classes, ["a photo of a {c}."], "cpu", amp=False
    )
    for name, value in theirs.items():
        assert ours[name] == pytest.approx(value, abs=1e-6), name  # theirs: float32 means


def test_cli_evaluates_several_sources_and_prints_the_metrics(tmp_path, capsys):
    planted = Planted(tmp_path)
    worse = Planted(tmp_path / "worse", noise=4.0)
    code = main(
        [
            "evaluate",
            planted.meta_uri,
            "--embeddings",
            planted.emb_uri,
            "--text-embeddings",
            planted.text_uri,
            "--embeddings",
            worse.emb_uri,
            "--text-embeddings",
            worse.text_uri,
            "--templates",
            ",".join(TEMPLATES),
            "--recall-k",
            "1,5",
            "--tasks",
            "zeroshot,retrieval,image_retrieval",
            "--device",
            "cpu",
            "--out",
            str(tmp_path / "out"),
        ]
    )
    assert code == 0
    printed = json.loads(capsys.readouterr().out)
    assert len(printed["models"]) == 2
    assert all("text_retrieval_recall@5" in v for v in printed["model_metrics"].values())

    code = main(
        [
            "evaluate",
            planted.meta_uri,
            "--embeddings",
            planted.emb_uri,
            "--tasks",
            "zeroshot",
            "--out",
            str(tmp_path / "o2"),
        ]
    )
    assert code != 0
    assert "without --text-embeddings" in capsys.readouterr().err


def test_cli_without_a_model_or_embeddings_says_so(tmp_path, capsys):
    planted = Planted(tmp_path)
    assert main(["evaluate", planted.meta_uri, "--out", str(tmp_path / "out")]) != 0
    assert "give --weights MODEL or --embeddings URI" in capsys.readouterr().err
    with pytest.raises(SystemExit):  # argparse's usage error
        main(["evaluate", planted.meta_uri, "--text-embeddings", "t", "--out", "o"])
    assert "--text-embeddings follows the --embeddings" in capsys.readouterr().err


@pytest.fixture(scope="module")
def seeded_backbone_embeddings(demo_images, tiny_entry, tmp_path_factory):
    """The demo images embedded by the tiny model, randomly initialised with seed 2."""
    from embedpipe.config import EmbedSettings
    from embedpipe.embed.images import embed_images

    out = str(tmp_path_factory.mktemp("eval-head") / "emb")
    settings = EmbedSettings(weights="random", seed=2, num_workers=0, device="cpu")
    embed_images(demo_images, out, settings, tiny_entry)
    return out


@pytest.mark.parametrize("recorded_seed", [2, 3])
def test_a_head_beside_its_backbones_embeddings_projects_them(
    seeded_backbone_embeddings, demo_images, tiny_entry, tmp_path, monkeypatch, caplog,
    recorded_seed,
):  # fmt: skip
    """Projecting the embeddings gives the metrics of re-embedding every image through the
    backbone; embeddings of another backbone (seed) are never projected."""
    from embedpipe.evaluate import sources
    from embedpipe.models.heads import ProjectionHead, save_head_checkpoint

    torch.manual_seed(0)
    head = ProjectionHead(in_dim=64, depth=2, width=32, out_dim=16)
    checkpoint = str(tmp_path / "head")
    save_head_checkpoint(head, tiny_entry, checkpoint, weights="random", seed=recorded_seed)
    config = _settings(tasks=("image_retrieval",), query_split="test")
    alone = evaluate_models([ModelSource(checkpoint)], demo_images, str(tmp_path / "a"), config)

    re_embedded = []
    model_encoder = sources.ModelEncoder

    def counting(*args, **kwargs):
        re_embedded.append(args[0].weights)
        return model_encoder(*args, **kwargs)

    monkeypatch.setattr(sources, "ModelEncoder", counting)
    both = [
        EmbeddingsSource(seeded_backbone_embeddings, name="untrained"),
        ModelSource(checkpoint, name="trained"),
    ]
    with caplog.at_level("INFO", logger="embedpipe.evaluate"):
        result = evaluate_models(both, demo_images, str(tmp_path / "b"), config)
    assert re_embedded == ([] if recorded_seed == 2 else [checkpoint])
    if recorded_seed != 2:
        assert f"seed 2, the head's backbone {recorded_seed}" in caplog.text
    (expected,) = alone.model_metrics.values()
    assert expected["image_image_queries"] > 0
    # projected and re-embedded vectors differ in the last float32 bits, which can swap two
    # near-tied gallery images: recall@K stays put, the mean average precision moves ~1e-5
    for metric, value in expected.items():
        assert result.model_metrics["trained"][metric] == pytest.approx(value, abs=1e-4), metric


@pytest.mark.parametrize(
    ("field", "value", "said"),
    [
        ("model", "other", "model 'other'"),
        ("weights", "openai", "weights 'openai'"),
        ("seed", 4, "seed 4"),
        ("normalized", False, "normalized False"),
        ("dim", 32, "dim 32"),
    ],
)
def test_embeddings_of_another_backbone_are_told_apart_by_the_field_that_differs(
    field, value, said
):
    from embedpipe.evaluate.sources import _backbone_difference

    manifest = {"model": "tiny", "weights": "random", "seed": 2, "normalized": True, "dim": 64}
    head = {
        "kind": "head",
        "backbone": {"entry": {"name": "tiny"}, "weights": "random", "seed": 2},
        "head": {"in_dim": 64},
    }
    assert _backbone_difference(manifest, head) == ""
    assert _backbone_difference({**manifest, field: value}, head).startswith(said)


def test_a_head_saved_before_seeds_were_recorded_loads_the_seed_0_backbone(tiny_entry, tmp_path):
    from embedpipe.models.heads import ProjectionHead, save_head_checkpoint
    from embedpipe.models.loading import load_model

    save_head_checkpoint(ProjectionHead(in_dim=64, out_dim=8), tiny_entry, str(tmp_path / "h"))
    config_path = tmp_path / "h" / "config.json"
    config = json.loads(config_path.read_text())
    config["backbone"] = {"entry": config["backbone"]["entry"], "weights": "random"}
    config_path.write_text(json.dumps(config))
    headed = load_model(tiny_entry, str(tmp_path / "h"))
    seed_0 = load_model(tiny_entry, "random", seed=0)
    for name, tensor in seed_0.module.state_dict().items():
        torch.testing.assert_close(headed.module.backbone.state_dict()[name], tensor)
