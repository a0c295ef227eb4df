"""evaluate, embed and publish under hostile input: non-finite embeddings, figures that
would mean nothing, invalid settings and damaged sources found before any work, damaged
weights files and images named in one line."""

import json

import numpy as np
import pyarrow as pa
import pytest
import torch
from test_evaluate import TEMPLATES, Planted, _settings, _vectors_table

from embedpipe.cli import main
from embedpipe.config import EvaluateSettings
from embedpipe.core import datasets
from embedpipe.core.finite import NonFiniteError
from embedpipe.evaluate import sources as sources_module
from embedpipe.evaluate.sources import EmbeddingsSource, MissingGroundTruth, ModelSource
from embedpipe.evaluate.stage import evaluate_models
from embedpipe.models.registry import ModelError


def _one_line_error(capsys) -> str:
    error = capsys.readouterr().err.strip()
    assert "\n" not in error and "Traceback" not in error
    return error


def test_non_finite_embeddings_are_refused_naming_the_model(tmp_path):
    planted = Planted(tmp_path)
    vectors = planted.image_vectors.copy()
    vectors[3, 0] = np.nan
    broken = str(tmp_path / "nan-emb")
    datasets.write_table(broken, _vectors_table("image_id", planted.ids, vectors), "embeddings")
    out = tmp_path / "out"
    with pytest.raises(NonFiniteError, match=r"model nan-emb produced non-finite embeddings"):
        evaluate_models([EmbeddingsSource(broken)], planted.meta_uri, str(out), _settings())
    assert not out.exists()


def test_embed_refuses_the_non_finite_output_of_a_diverged_model(
    tiny_entry, demo_images, tmp_path, capsys
):
    from embedpipe.models.loading import load_model, save_model

    model = load_model(tiny_entry, "random")
    with torch.no_grad():
        next(model.module.visual.parameters()).fill_(float("nan"))
    save_model(model, str(tmp_path / "nan-ckpt"))
    argv = ["embed", demo_images, "--weights", str(tmp_path / "nan-ckpt"), "--device", "cpu"]
    assert main([*argv, "--out", str(tmp_path / "emb")]) == 1
    error = _one_line_error(capsys)
    assert "model tiny produced non-finite embeddings" in error
    assert not (tmp_path / "emb" / ".embedpipe" / "manifest.json").exists()


def test_zero_shot_over_one_class_is_a_marked_skip_or_an_error_when_named(tmp_path):
    planted = Planted(tmp_path)
    one = [i for i in planted.ids if i.startswith("shape-0-")]
    select = str(tmp_path / "one-class")
    datasets.write_table(select, pa.table({"image_id": one}), "selection")
    out = tmp_path / "out"
    result = evaluate_models(
        [planted.source()], planted.meta_uri, str(out), _settings(), select_uri=select
    )
    reason = result.skipped[f"{result.models[0]}: zeroshot"]
    assert "1 class" in reason and "means nothing" in reason
    assert "zeroshot_acc1" not in result.model_metrics[result.models[0]]
    saved = json.loads((out / ".embedpipe" / "metrics.json").read_text())
    assert "1 class" in saved["models"][0]["skipped"]["zeroshot"]
    assert "1 class in the data" in (out / ".embedpipe" / "report.html").read_text()
    with pytest.raises(MissingGroundTruth, match="1 class in the data"):
        evaluate_models(
            [planted.source()],
            planted.meta_uri,
            str(tmp_path / "o2"),
            _settings(tasks=("zeroshot",)),
            select_uri=select,
        )


def test_a_selection_that_keeps_no_image_is_an_error(tmp_path, capsys):
    planted = Planted(tmp_path)
    select = str(tmp_path / "none")
    datasets.write_table(select, pa.table({"image_id": ["not-there"]}), "selection")
    argv = ["evaluate", planted.meta_uri, "--embeddings", planted.emb_uri, "--select", select]
    assert main([*argv, "--device", "cpu", "--out", str(tmp_path / "out")]) == 1
    assert f"--select {select}: keeps none of the 108 images" in _one_line_error(capsys)
    assert not (tmp_path / "out").exists()


def test_a_recall_k_larger_than_a_gallery_is_an_error_when_given_a_skip_by_default(tmp_path):
    planted = Planted(tmp_path)
    small = [i for i in planted.ids if i.startswith(("shape-0-", "shape-1-"))]
    select = str(tmp_path / "small")
    datasets.write_table(select, pa.table({"image_id": small}), "selection")
    settings = _settings().model_copy(update={"recall_k": (1, 500)})
    with pytest.raises(MissingGroundTruth, match=r"^recall_k 500 is larger than the "):
        evaluate_models(
            [planted.source()], planted.meta_uri, str(tmp_path / "o"), settings, select_uri=select
        )
    # the default Ks (1, 5, 10) over a gallery of 17: measured; over one of 8: skipped
    tiny = [i for i in planted.ids if i.startswith("shape-0-")]
    datasets.write_table(select, pa.table({"image_id": tiny}), "selection")
    default = EvaluateSettings(device="cpu", templates=TEMPLATES)
    result = evaluate_models(
        [planted.source()], planted.meta_uri, str(tmp_path / "o2"), default, select_uri=select
    )
    reason = result.skipped[f"{result.models[0]}: image_retrieval"]
    assert reason == "recall_k 10 is larger than the gallery of category 'shape' (8 images)"


def test_an_invalid_given_setting_is_an_error_even_when_the_default_tasks_run(
    tmp_path, capsys, monkeypatch
):
    planted = Planted(tmp_path)
    calls = []
    monkeypatch.setattr(
        sources_module.PrecomputedEncoder, "images", lambda self, ids: calls.append(ids)
    )
    base = ["evaluate", planted.meta_uri, "--embeddings", planted.emb_uri, "--device", "cpu"]
    out = ["--out", str(tmp_path / "out")]
    assert main([*base, "--probe-label-column", "nosuch", *out]) == 1
    assert "probe_label_column 'nosuch': the metadata has no 'nosuch' column" in (
        _one_line_error(capsys)
    )
    missing = str(tmp_path / "no-such-map.json")
    assert main([*base, "--class-map-file", missing, *out]) == 1
    assert f"class_map_file {missing}: cannot be read" in _one_line_error(capsys)
    assert main([*base, "--class-names", "apple,pear", *out]) == 1
    assert "class names do not match the data's labels" in _one_line_error(capsys)
    assert calls == [] and not (tmp_path / "out").exists()  # found before any work


def test_every_source_is_checked_before_the_first_is_evaluated(
    tmp_path, tiny_checkpoint_dir, capsys, monkeypatch
):
    planted = Planted(tmp_path)
    calls = []
    monkeypatch.setattr(
        sources_module.PrecomputedEncoder, "images", lambda self, ids: calls.append(ids)
    )
    no_config = tmp_path / "no-config"
    no_config.mkdir()
    (no_config / "model.safetensors").write_bytes(b"x")
    base = ["evaluate", planted.meta_uri, "--embeddings", planted.emb_uri, "--device", "cpu"]
    out = ["--out", str(tmp_path / "out")]
    assert main([*base, "--weights", str(no_config), *out]) == 1
    assert f"--weights {no_config}: not a registry entry, a checkpoint folder (no config" in (
        _one_line_error(capsys)
    )
    assert main([*base, "--weights", str(tmp_path / "nowhere"), *out]) == 1
    assert "nowhere: no such file or folder" in _one_line_error(capsys)
    assert main([*base, "--embeddings", str(tmp_path / "nowhere"), *out]) == 1
    assert "nowhere: not a complete embedpipe dataset" in _one_line_error(capsys)
    assert calls == [] and not (tmp_path / "out").exists()


@pytest.fixture
def tiny_checkpoint_dir(tiny_entry, tmp_path):
    from embedpipe.models.loading import load_model, save_model

    path = tmp_path / "ckpt"
    save_model(load_model(tiny_entry, "random"), str(path))
    return path


@pytest.mark.parametrize("cut", ["empty", "truncated", "garbage"])
def test_a_damaged_weights_file_is_one_line_naming_it(
    tiny_checkpoint_dir, demo_images, tmp_path, capsys, cut
):
    weights = tiny_checkpoint_dir / "model.safetensors"
    data = weights.read_bytes()
    damaged = {"empty": b"", "truncated": data[: len(data) // 3], "garbage": b"\x00" * 64}[cut]
    weights.write_bytes(damaged)
    runs = {
        "embed": ["embed", demo_images, "--weights", str(tiny_checkpoint_dir), "--device", "cpu"],
        "evaluate": ["evaluate", demo_images, "--weights", str(tiny_checkpoint_dir),
                     "--device", "cpu"],
        "publish": ["publish", str(tiny_checkpoint_dir), "--device", "cpu"],
    }  # fmt: skip
    for stage, argv in runs.items():
        assert main([*argv, "--out", str(tmp_path / stage)]) == 1, stage
        error = _one_line_error(capsys)
        assert f"{weights}: damaged weights file" in error, (stage, error)
    from embedpipe.models.loading import load_model
    from embedpipe.models.registry import ModelEntry

    entry = ModelEntry.model_validate(
        json.loads((tiny_checkpoint_dir / "config.json").read_text())["entry"]
    )
    with pytest.raises(ModelError, match="damaged weights file"):
        load_model(entry, str(tiny_checkpoint_dir))


def test_a_corrupt_image_in_evaluate_names_its_id(tiny_checkpoint_dir, demo_images, tmp_path):
    table = datasets.read_table(demo_images, "images").slice(0, 12)
    ids = table.column("image_id").to_pylist()
    images = table.column("image").to_pylist()
    images[5] = b"\xff\xd8 not really a jpeg"
    broken = table.set_column(
        table.column_names.index("image"),
        "image",
        pa.array(images, table.schema.field("image").type),
    )
    corrupt = str(tmp_path / "images")
    datasets.write_table(corrupt, broken, "images")
    with pytest.raises(ValueError, match=rf"{corrupt}: image {ids[5]} cannot be decoded"):
        evaluate_models(
            [ModelSource(str(tiny_checkpoint_dir))],
            corrupt,
            str(tmp_path / "out"),
            EvaluateSettings(device="cpu", tasks=("anomaly",), anomaly_neighbors=2),
        )
