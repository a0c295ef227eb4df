"""pairs image_signal: a projection head on frozen image embeddings trained jointly with a
signal encoder. Its loss is open_clip's across the two towers, it learns (held-out
cross-modal recall@1 rises), its validation matches a numpy brute force, and bad settings
are one-line errors."""

import json
import shutil

import numpy as np
import pyarrow as pa
import pytest
import torch
from open_clip import loss as open_clip_loss
from pydantic import ValidationError

from embedpipe.config import ConfigError, EvaluateSettings, TrainSettings
from embedpipe.core import datasets, storage
from embedpipe.core.schemas import IMAGES_SCHEMA
from embedpipe.evaluate.image_signal import evaluate_image_signal
from embedpipe.models.registry import get_entry
from embedpipe.train.data import load_examples
from embedpipe.train.pairs_signal import ImageSignalTask, cross_modal_recall
from embedpipe.train.stage import train_model
from tests.train.test_learning import write_embeddings, write_selection

OBJECTS, VIEWS, DIM, LENGTH = 48, 3, 24, 64


@pytest.fixture(scope="module")
def paired(tmp_path_factory):
    """Objects with hidden parameters seen twice: an image embedding (a random linear map
    of them plus noise, as frozen features are) and a signal (another map, plus noise);
    a third of the objects held out."""
    root = tmp_path_factory.mktemp("paired")
    rng = np.random.default_rng(0)
    hidden = rng.normal(size=(OBJECTS, 6))
    to_image, to_signal = rng.normal(size=(6, DIM)), rng.normal(size=(6, LENGTH))
    ids, concepts, signals, vectors = [], [], [], []
    for obj in range(OBJECTS):
        for view in range(VIEWS):
            ids.append(f"{obj:03d}-{view}")
            concepts.append(f"object_{obj:03d}")
            vectors.append(hidden[obj] @ to_image + 0.3 * rng.normal(size=DIM))
            signals.append(hidden[obj] @ to_signal + 0.3 * rng.normal(size=LENGTH))
    count = len(ids)
    base = {
        "image_id": ids,
        "image": [b"png"] * count,
        "source": [f"mem/{i}.png" for i in ids],
        "category": ["galaxy"] * count,
        "concept": concepts,
        "split": [None] * count,
        "width": [64] * count,
        "height": [64] * count,
    }
    schema = IMAGES_SCHEMA.append(pa.field("spectrum", pa.list_(pa.float32()))).append(
        pa.field("redshift", pa.float64())
    )
    redshift = [float(hidden[int(c[-3:]), 0]) for c in concepts]
    table = pa.table(
        {
            **base,
            "spectrum": [s.astype(np.float32).tolist() for s in signals],
            "redshift": redshift,
        },
        schema=schema,
    )
    images = str(root / "images")
    datasets.write_table(images, table, "images")
    manifest = datasets.read_manifest(images)
    manifest["signals"] = {
        "columns": {"spectrum": {"kind": "signal", "length": None}, "redshift": {"kind": "scalar"}}
    }
    storage.write_json(datasets.side_path(images, datasets.MANIFEST_NAME), manifest)
    matrix = np.asarray(vectors, np.float32)
    matrix /= np.linalg.norm(matrix, axis=1, keepdims=True)
    embeddings = write_embeddings(str(root / "emb"), ids, matrix, "tiny_backbone")
    held_out = {f"object_{obj:03d}" for obj in range(0, OBJECTS, 3)}
    splits = write_selection(
        str(root / "splits"), ids, ["val" if c in held_out else "train" for c in concepts]
    )
    return {"root": root, "images": images, "embeddings": embeddings, "splits": splits}


def settings(**overrides) -> TrainSettings:
    values = dict(
        model="tiny_backbone",
        mode="head",
        pairs="image_signal",
        signal_column="spectrum",
        signal_model="signal_cnn_small",
        loss="infonce",
        depth=1,
        lr=3e-3,
        batch_size=32,
        steps=120,
        val_every=60,
        num_workers=0,
        device="cpu",
    )
    return TrainSettings(**(values | overrides))


@pytest.fixture(scope="module")
def backbone(tiny_entry):
    return tiny_entry.model_copy(update={"name": "tiny_backbone"})


def task_for(paired, backbone, config):
    examples = load_examples(paired["images"], config, paired["splits"])
    return ImageSignalTask(
        backbone,
        config,
        examples,
        paired["images"],
        paired["embeddings"],
        torch.device("cpu"),
        {},
    )


@pytest.mark.parametrize(
    ("name", "theirs"),
    [("infonce", open_clip_loss.ClipLoss()), ("pairwise_sigmoid", open_clip_loss.SigLipLoss())],
)
def test_loss_is_open_clips_on_the_two_towers(paired, backbone, name, theirs):
    task = task_for(paired, backbone, settings(loss=name))
    batch = next(task.batches(0, [task.train_rows[:20].tolist()]))
    image, signal, _, scale, bias = task.features_of(task.module, batch)
    ours = task.loss_from((image, signal, None, scale, bias), batch)
    extra = () if bias is None else (bias,)
    expected = theirs(image, signal, scale, *extra)
    assert torch.isclose(ours, expected, rtol=1e-5, atol=1e-6)
    ours.backward()
    grads = [p.grad for p in task.module.encoder.parameters()]
    assert any(g is not None and g.abs().sum() > 0 for g in grads)


def test_validation_matches_numpy_brute_force():
    rng = np.random.default_rng(1)
    image = torch.nn.functional.normalize(torch.randn(30, 8), dim=-1)
    signal = torch.nn.functional.normalize(torch.randn(30, 8), dim=-1)
    objects = np.repeat(np.arange(10), 3)
    rng.shuffle(objects)
    ours = cross_modal_recall(image, signal, objects, (1, 5), "val_")
    scores = image.numpy() @ signal.numpy().T
    for k in (1, 5):
        for name, s in (("recall", scores), ("signal_to_image_recall", scores.T)):
            top = np.argsort(-s, axis=1)[:, :k]
            hits = [(objects[top[q]] == objects[q]).any() for q in range(len(s))]
            assert ours[f"val_{name}_at_{k}"] == pytest.approx(np.mean(hits))


@pytest.fixture(scope="module")
def trained(paired, backbone):
    out = paired["root"] / "model"
    result = train_model(
        paired["images"],
        str(out),
        settings(),
        backbone,
        splits_uri=paired["splits"],
        embeddings_uri=paired["embeddings"],
    )
    return out, result


def test_training_raises_held_out_cross_modal_recall(trained):
    out, result = trained
    assert result.best_metric == "val_recall_at_1"
    assert result.best_value >= result.untrained_value + 0.2, result
    config = json.loads((out / "config.json").read_text())
    assert config["kind"] == "image_signal"
    assert config["signal"]["entry"]["name"] == "signal_cnn_small"
    assert config["image"]["backbone"]["entry"]["name"] == "tiny_backbone"
    assert get_entry("signal_cnn_small").embed_dim == config["image"]["head"]["out_dim"]


def test_evaluation_untrained_and_trained_side_by_side(paired, trained):
    """The checkpoint's folded head and encoder reproduce the training's own validation
    direction: cross-modal recall rises with training."""
    out, _ = trained
    config = EvaluateSettings(recall_k=(1, 5))
    evaluation = evaluate_image_signal(paired["images"], str(out), paired["splits"], config)
    before, after = evaluation.runs
    assert (before.name, after.name) == ("untrained", "trained")
    assert after.metrics["image_to_signal_recall@5"] > before.metrics["image_to_signal_recall@5"]
    assert set(after.regression) == {"image", "signal", "both"}
    assert set(after.regression["signal"]) == {"knn", "ridge"}
    # R² need not rise here: these signals are a linear map of the hidden parameters, which
    # a random encoder keeps as well as a trained one (the demo's figures are in the README)
    for run in (before, after):
        assert all(np.isfinite(v["ridge"]["redshift_r2"]) for v in run.regression.values())


def _numpy_ridge(train_x, train_y, test_x, alpha):
    """Ridge with an unpenalised intercept on features standardised on the training rows,
    in closed form."""
    spread = train_x.std(0)
    spread[spread == 0] = 1.0
    train_x, test_x = (train_x - train_x.mean(0)) / spread, (test_x - train_x.mean(0)) / spread
    mean_x, mean_y = train_x.mean(0), train_y.mean()
    centred = train_x - mean_x
    gram = centred.T @ centred + alpha * np.eye(train_x.shape[1])
    weights = np.linalg.solve(gram, centred.T @ (train_y - mean_y))
    return (test_x - mean_x) @ weights + mean_y


def _numpy_knn(train_x, train_y, test_x, k):
    unit = lambda x: x / np.linalg.norm(x, axis=1, keepdims=True)  # noqa: E731
    distances = 1 - unit(test_x) @ unit(train_x).T
    nearest = np.argsort(distances, axis=1, kind="stable")[:, :k]
    return train_y[nearest].mean(1)


def _r2(truth, predicted):
    return 1 - ((truth - predicted) ** 2).sum() / ((truth - truth.mean()) ** 2).sum()


def test_evaluation_numbers_equal_a_numpy_computation(paired, trained):
    """Recall@K by brute force over the score matrix (an image's positives: the signals
    of its object), R² of a closed-form Ridge and a brute-force cosine kNN regressor."""
    config = EvaluateSettings(recall_k=(1, 5), regression_alpha=0.5, regression_neighbors=4)
    evaluation = evaluate_image_signal(paired["images"], str(trained[0]), paired["splits"], config)
    held = evaluation.held_out
    objects = np.array(evaluation.concepts)[held]
    same = objects[:, None] == objects[None, :]
    for run in evaluation.runs:
        image, signal = run.vectors["image"], run.vectors["signal"]
        scores = image[held] @ signal[held].T
        for name, matrix in (("image_to_signal", scores), ("signal_to_image", scores.T)):
            order = np.argsort(-matrix, axis=1, kind="stable")
            for k in (1, 5):
                hits = np.take_along_axis(same, order[:, :k], axis=1).any(1)
                assert run.metrics[f"{name}_recall@{k}"] == pytest.approx(hits.mean(), abs=1e-6)
        both = np.concatenate([image, signal], axis=1)
        for source, matrix in (("image", image), ("signal", signal), ("both", both)):
            for target, values in evaluation.targets.items():
                fit, score = ~held & ~np.isnan(values), held & ~np.isnan(values)
                ridge = _numpy_ridge(matrix[fit], values[fit], matrix[score], 0.5)
                knn = _numpy_knn(matrix[fit], values[fit], matrix[score], 4)
                ours = run.regression[source]
                # the embeddings are float32, which sklearn keeps: 1e-4, not float64's 1e-6
                assert ours["ridge"][f"{target}_r2"] == pytest.approx(
                    _r2(values[score], ridge), abs=1e-4
                )
                assert ours["knn"][f"{target}_r2"] == pytest.approx(
                    _r2(values[score], knn), abs=1e-4
                )


def test_resume_continues_from_the_checkpoint(paired, backbone):
    out = paired["root"] / "resumed"
    common = dict(splits_uri=paired["splits"], embeddings_uri=paired["embeddings"])
    config = settings(steps=20, checkpoint_every=10)
    train_model(paired["images"], str(out), config, backbone, **common)
    again = train_model(paired["images"], str(out), config, backbone, **common)
    assert again.resumed_from_step == 20


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        (dict(loss="triplet"), "loss: triplet needs negatives of the anchor's own modality"),
        (dict(signal_column=""), "signal_column: image_signal needs"),
    ],
)
def test_bad_settings_are_one_line_errors(overrides, message):
    with pytest.raises(ValidationError, match=message):
        settings(**overrides)


def test_unknown_signal_column_and_non_signal_model(paired, backbone):
    with pytest.raises(ValueError, match="no signal column 'flux'"):
        task_for(paired, backbone, settings(signal_column="flux"))
    with pytest.raises(ConfigError, match="signal_model: clip_vitb32 is not a signal encoder"):
        task_for(paired, backbone, settings(signal_model="clip_vitb32"))
    with pytest.raises(ConfigError, match="signal_model: unknown model 'nosuch'"):
        task_for(paired, backbone, settings(signal_model="nosuch"))


def test_evaluate_stage_writes_both_models_metrics(paired, trained):
    from embedpipe.evaluate.sources import EmbeddingsSource, ModelSource
    from embedpipe.evaluate.stage import METRICS_NAME, REPORT_NAME, evaluate_models

    out = paired["root"] / "evaluation"
    config = EvaluateSettings(recall_k=(1, 5))
    sources = [
        EmbeddingsSource(paired["embeddings"], name="untrained"),  # as end_to_end gives it
        ModelSource(str(trained[0])),
    ]
    result = evaluate_models(sources, paired["splits"], str(out), config, paired["images"])
    assert result.models == ["untrained", "trained"]
    written = storage.read_json(datasets.side_path(str(out), METRICS_NAME))
    assert written["kind"] == "image_signal"
    trained_entry = written["models"][1]
    assert trained_entry["identity"]
    for name in ("image_to_signal_recall@5", "signal_to_image_recall@1"):
        assert trained_entry["metrics"][name] == pytest.approx(
            result.model_metrics["trained"][name]
        )
    assert set(trained_entry["regression"]["both"]["ridge"]) == {"redshift_r2"}
    assert "redshift_r2 (both, ridge)" in result.model_metrics["trained"]
    page = storage.read_bytes(datasets.side_path(str(out), REPORT_NAME)).decode("utf-8")
    for section in ("Cross-modal recall@K", "redshift: Ridge prediction", "signal tower"):
        assert section in page
    table = datasets.read_table(str(out))
    assert set(table.column("model").to_pylist()) == {"untrained", "trained"}
    assert "redshift_predicted_image" in table.column_names


def test_a_baseline_made_by_another_model_is_refused(paired, trained, tmp_path):
    from embedpipe.evaluate.sources import EmbeddingsSource, MissingGroundTruth, ModelSource
    from embedpipe.evaluate.stage import evaluate_models

    other = tmp_path / "other"
    shutil.copytree(paired["embeddings"], other)
    manifest = other / ".embedpipe" / "manifest.json"
    manifest.write_text(manifest.read_text().replace('"tiny_backbone"', '"someone_else"'))
    sources = [EmbeddingsSource(str(other)), ModelSource(str(trained[0]))]
    with pytest.raises(MissingGroundTruth, match="made by someone_else"):
        evaluate_models(
            sources, paired["splits"], str(tmp_path / "out"), EvaluateSettings(), paired["images"]
        )


def test_tuning_trains_with_a_signal_encoder_of_the_config_file(paired, backbone, tmp_path):
    """`[train].signal_model` naming a `[models.NAME]` table reaches every trial."""
    from embedpipe.config import TuneSettings
    from embedpipe.tune.study import tune_model

    arch = {"signal_length": 0, "channels": [8, 16], "kernel_size": 5, "stride": 2}
    own = {"library": "signal", "architecture": "signal_cnn", "embed_dim": 16, "arch": arch}
    tune = TuneSettings(
        n_trials=1, space={"lr": {"type": "float", "low": 1e-3, "high": 3e-3, "log": True}}
    )
    result = tune_model(
        paired["images"],
        str(tmp_path / "study"),
        tune,
        settings(signal_model="my_cnn", steps=10, val_every=10),
        backbone,
        splits_uri=paired["splits"],
        embeddings_uri=paired["embeddings"],
        models={"my_cnn": own},
    )
    assert result.trials_complete == 1, result
    trial = next((tmp_path / "study" / "runs").iterdir())
    config = json.loads((trial / "config.json").read_text())
    assert config["signal"]["entry"]["name"] == "my_cnn"
    assert config["signal"]["entry"]["arch"]["channels"] == [8, 16]
