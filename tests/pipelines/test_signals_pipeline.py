"""The signals demo's config compiles into the same end-to-end pipeline, without the
mining fan-out (images paired with signals take no mined image negatives), and a run's
summary reads the cross-modal metrics."""

import pytest

from embedpipe.config import load_settings
from embedpipe.pipelines import end_to_end
from embedpipe.pipelines.compile import compile_pipelines, read_pipeline_spec


def test_the_signals_config_compiles_without_mining(tmp_path):
    settings = load_settings("configs/signals.toml")
    assert end_to_end.stages(settings) == (
        "ingest", "catalog", "split", "dedup", "embed", "train", "evaluate", "publish",
    )  # fmt: skip
    compile_pipelines(settings, str(tmp_path))
    spec = read_pipeline_spec(tmp_path / "end_to_end.yaml")
    tasks = spec["root"]["dag"]["tasks"]
    assert not {"partition", "mine", "combine", "to-hf"} & set(tasks)
    assert "negatives" not in tasks["train"]["inputs"]["artifacts"]
    component = spec["components"][tasks["train"]["componentRef"]["name"]]
    assert component["inputDefinitions"]["artifacts"]["negatives"]["isOptional"] is True
    assert set(spec["root"]["outputDefinitions"]["artifacts"]) == {
        "embeddings", "model", "evaluation", "evaluation_report", "published",
    }  # fmt: skip
    train_settings = tasks["train"]["inputs"]["parameters"]["settings"]["runtimeValue"]
    assert train_settings["constant"]["pairs"] == "image_signal"
    alone = read_pipeline_spec(tmp_path / "train.yaml")["root"]["dag"]["tasks"]
    assert "negatives" not in alone["train"]["inputs"]["artifacts"]  # the train pipeline too


def test_the_image_demo_keeps_its_mining_steps(tmp_path):
    settings = load_settings("configs/demo.toml")
    compile_pipelines(settings, str(tmp_path))
    tasks = read_pipeline_spec(tmp_path / "end_to_end.yaml")["root"]["dag"]["tasks"]
    assert {"partition", "combine"} <= set(tasks)
    assert tasks["train"]["inputs"]["artifacts"]["negatives"]["taskOutputArtifact"] == {
        "outputArtifactKey": "combined",
        "producerTask": "combine",
    }


def test_the_summary_shows_cross_modal_recall_and_r2_before_and_after():
    def run(name, recall, image_r2, signal_r2):
        return {
            "model": name,
            "metrics": {"image_to_signal_recall@1": recall, "signal_to_image_recall@1": recall},
            "regression": {
                "image": {"ridge": {"redshift_r2": image_r2}, "knn": {"redshift_r2": 0.0}},
                "signal": {"ridge": {"redshift_r2": signal_r2}, "knn": {"redshift_r2": 0.0}},
            },
        }

    runs = {
        "untrained": run("untrained", 0.01, 0.4, -0.1),
        "trained": run("trained", 0.2, 0.6, 0.7),
    }
    lines = end_to_end.signal_summary(runs)
    assert lines == [
        "held-out image->signal recall@1: untrained 0.01 -> trained 0.20",
        "held-out signal->image recall@1: untrained 0.01 -> trained 0.20",
        "held-out redshift R² (Ridge) from image 0.40 -> 0.60, signal -0.10 -> 0.70",
    ]


def test_tuning_signals_compiles_without_negatives_and_refuses_mine_keys(tmp_path):
    from pathlib import Path

    from embedpipe.config import ConfigError
    from embedpipe.tune.space import check_search, reported_metrics

    text = Path("configs/signals.toml").read_text(encoding="utf-8")
    config = tmp_path / "tuned.toml"
    config.write_text(
        text + '\n[tune]\nn_trials = 2\n[tune.space]\nlr = { type = "float", low = 1e-4, '
        "high = 1e-2, log = true }\n"
    )
    settings = load_settings(str(config))
    compile_pipelines(settings, str(tmp_path / "build"))
    tasks = read_pipeline_spec(tmp_path / "build" / "end_to_end.yaml")["root"]["dag"]["tasks"]
    assert "negatives" not in tasks["tune"]["inputs"]["artifacts"]
    assert "negatives" not in tasks["train"]["inputs"]["artifacts"]
    assert "val_signal_to_image_recall_at_1" in reported_metrics(settings.train)
    searching_mine = settings.tune.model_copy(
        update={"space": {**settings.tune.space, "mine.margin": settings.tune.space["lr"]}}
    )
    with pytest.raises(ConfigError, match=r"mine.margin: images paired with signals"):
        check_search(searching_mine, settings.train)


def test_a_config_file_signal_encoder_is_refused_for_the_cluster_trainer():
    from embedpipe.config import ConfigError, TrainSettings
    from embedpipe.kube.objects import check_cluster_model

    train = TrainSettings(
        model="clip_vitb32", pairs="image_signal", signal_column="spectrum", signal_model="mine"
    )
    with pytest.raises(ConfigError, match=r"\[train\].signal_model 'mine' is a \[models\] entry"):
        check_cluster_model(train, {"mine": {"library": "signal"}})
    check_cluster_model(train, {})  # registry encoders travel
