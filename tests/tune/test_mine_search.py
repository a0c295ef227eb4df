"""[mine]'s false-negative filters in the search space: written ``mine.KEY``, checked
before any trial, and re-mined per trial, whose negatives match a numpy brute-force
selection with the trial's filters."""

import json

import numpy as np
import pyarrow.dataset as pads
import pytest
from conftest import head_train

from embedpipe.cli import main
from embedpipe.config import ConfigError, MineSettings, TrainSettings, TuneSettings
from embedpipe.core import datasets
from embedpipe.mining.partition import embedding_matrix
from embedpipe.tune import study as tune_study
from embedpipe.tune.space import check_search, split_params, trial_mine_settings
from embedpipe.tune.study import tune_model


def _config(tmp_path, space: str, tune: str = "") -> str:
    path = tmp_path / "c.toml"
    path.write_text(f"[tune]\n{tune}\n[tune.space]\n{space}\n")
    return str(path)


def oracle_negatives(splits_uri: str, embeddings_uri: str, config: MineSettings) -> int:
    """Negatives the filters keep, by brute force: per category, each train query's
    other-concept train images by cosine, ranks rank_min..last rank, less those scoring
    above positive - margin (the mean similarity to its concept-mates), the first top_k."""
    meta = datasets.read_table(splits_uri).to_pylist()
    first = {}
    for row in meta:
        first.setdefault(row["image_id"], row)
    table = datasets.read_table(embeddings_uri)
    vectors = embedding_matrix(table.column("embedding")).astype(np.float64)
    vectors /= np.linalg.norm(vectors, axis=1, keepdims=True)
    row_of = {image_id: n for n, image_id in enumerate(table.column("image_id").to_pylist())}
    total = 0
    for category in sorted({r["category"] for r in first.values()}):
        train = [r for r in first.values() if r["category"] == category and r["split"] == "train"]
        train = [r for r in train if r["image_id"] in row_of]
        x = vectors[[row_of[r["image_id"]] for r in train]]
        concepts = np.array([r["concept"] for r in train])
        if len(set(concepts)) < 2:
            continue
        sims = x @ x.T
        for q in range(len(train)):
            mates = (concepts == concepts[q]) & (np.arange(len(train)) != q)
            positive = sims[q, mates].mean() if mates.any() else np.nan
            others = np.flatnonzero(concepts != concepts[q])
            ranked = others[np.argsort(-sims[q, others], kind="stable")]
            window = ranked[config.rank_min - 1 : config.last_rank]
            scores = sims[q, window]
            if config.margin is not None and not np.isnan(positive):
                scores = scores[~(scores + config.margin > positive)]
            total += min(config.top_k, len(scores))
    return total


def test_a_study_re_mines_each_trials_negatives_with_its_margin(
    tune_inputs, frozen_entry, tmp_path, monkeypatch
):
    from embedpipe.train import stage

    trained_on = {}
    real_train = stage.train_model

    def recording(images, out, config, entry, **inputs):
        trained_on[out] = inputs["negatives_uri"]
        return real_train(images, out, config, entry, **inputs)

    monkeypatch.setattr(stage, "train_model", recording)
    tune = TuneSettings(
        space={"mine": {"margin": {"type": "categorical", "choices": [-0.25, 0.0]}}},
        n_trials=2,
        algorithm="grid",
        metric="val_recall_at_1",
        pruning=False,
    )
    mine = MineSettings(gpu=False, top_k=3)
    result = tune_model(
        tune_inputs["images"],
        str(tmp_path / "t"),
        tune,
        head_train(hard_negative_share=0.25),
        frozen_entry,
        splits_uri=tune_inputs["splits"],
        embeddings_uri=tune_inputs["embeddings"],
        negatives_uri=tune_inputs["negatives"],
        mine=mine,
    )
    assert result.trials_complete == 2
    trials = pads.dataset(str(tmp_path / "t" / "trials")).to_table().to_pylist()
    margins = sorted(t["param_mine.margin"] for t in trials)
    assert margins == [-0.25, 0.0]
    counts = {}
    for trial in trials:
        margin = trial["param_mine.margin"]
        expected = oracle_negatives(
            tune_inputs["splits"],
            tune_inputs["embeddings"],
            mine.model_copy(update={"margin": margin}),
        )
        assert trial["negatives"] == expected
        assert trained_on[trial["out_uri"]] == trial["negatives_uri"]
        assert tune_study.negatives_count(trial["negatives_uri"]) == expected
        counts[margin] = trial["negatives"]
    assert counts[-0.25] > counts[0.0] > 0  # margin 0 drops what scores above the positive
    best = json.loads((tmp_path / "t" / "best.json").read_text())
    assert set(best["params"]) == {"mine.margin"}
    assert best["negatives_uri"].startswith(str(tmp_path / "t" / "mined"))


def test_mine_keys_are_checked_before_any_trial(tmp_path, capsys, monkeypatch):
    cases = [
        ('mine.marginn = { type = "float", low = 0.0, high = 0.1 }',
         "[tune].space.mine.marginn: unknown key, not a searchable [mine] filter"),
        ('mine.top_kk = { type = "int", low = 1, high = 4 }', "[tune].space.mine.top_kk"),
        ('mine.relative_margin = { type = "float", low = 0.0, high = 1.5 }',
         "[tune].space.mine.relative_margin: 1.5 is not a valid [mine].relative_margin"),
        ('mine.sampling = { type = "categorical", choices = ["top", "foo"] }',
         "[tune].space.mine.sampling: 'foo' is not a valid [mine].sampling"),
        ('mine.rank_min = { type = "float", low = 1, high = 4 }',
         "[tune].space.mine.rank_min: an integer setting takes type int"),
    ]  # fmt: skip
    for space, problem in cases:
        code = main(["tune", "images", "--out", str(tmp_path / "o"),
                     "--config", _config(tmp_path, space)])  # fmt: skip
        err = capsys.readouterr().err.strip()
        assert code != 0 and "\n" not in err and problem in err, (space, err)
        assert not (tmp_path / "o").exists()


def test_both_toml_spellings_hold_the_same_flat_key(tmp_path):
    from embedpipe.config import load_settings

    dotted = load_settings(_config(tmp_path, 'mine.margin = { type = "float", low = 0, high = 1 }'))
    path = tmp_path / "t.toml"
    path.write_text('[tune.space.mine]\nmargin = { type = "float", low = 0, high = 1 }\n')
    table = load_settings(str(path))
    assert list(dotted.tune.space) == list(table.tune.space) == ["mine.margin"]
    assert TuneSettings(space={"mine.margin": dotted.tune.space["mine.margin"]}) == dotted.tune


def test_trial_values_split_and_land_on_mine():
    tune = TuneSettings(
        space={
            "lr": {"type": "float", "low": 1e-4, "high": 1e-2},
            "mine.rank_max": {"type": "int", "low": 0, "high": 30},
            "mine.sampling": {"type": "categorical", "choices": ["top", "random"]},
        }
    )
    space = check_search(tune, TrainSettings(), MineSettings(top_k=3))
    assert set(space) == {"lr", "mine.rank_max", "mine.sampling"}
    train, mine = split_params({"lr": 1e-3, "mine.rank_max": 12, "mine.sampling": "random"})
    assert train == {"lr": 1e-3} and mine == {"rank_max": 12, "sampling": "random"}
    config = trial_mine_settings(MineSettings(top_k=3, gpu=False), mine)
    assert (config.rank_max, config.sampling, config.gpu) == (12, "random", False)
    with pytest.raises(ConfigError, match=r"mine.rank_max.*fewer than top_k 3"):
        trial_mine_settings(MineSettings(top_k=3, rank_min=5), {"rank_max": 6})


def test_searching_mine_needs_the_inputs_mining_reads(tune_inputs, frozen_entry, tmp_path):
    tune = TuneSettings(space={"mine.margin": {"type": "float", "low": 0.0, "high": 0.1}})
    with pytest.raises(ConfigError, match=r"--splits.*--embeddings"):
        tune_model(
            tune_inputs["images"], str(tmp_path / "t"), tune, head_train(), frozen_entry,
            negatives_uri=tune_inputs["negatives"], splits_uri=tune_inputs["splits"],
        )  # fmt: skip


def test_the_end_to_end_graph_trains_on_the_negatives_of_the_best_filters(tmp_path):
    """Compiled with the optuna backend: tune -> mine-negatives (the best [mine] overrides)
    -> train (its negatives); without mine keys, train takes the fan-out's negatives."""
    from kfp import compiler

    from embedpipe.config import Settings
    from embedpipe.pipelines import end_to_end
    from embedpipe.pipelines.compile import read_pipeline_spec

    def tasks(space) -> dict:
        settings = Settings(tune=TuneSettings(space=space))
        path = tmp_path / "e2e.yaml"
        compiler.Compiler().compile(end_to_end.build_pipeline(settings), str(path))
        return read_pipeline_spec(path)["root"]["dag"]["tasks"]

    lr = {"type": "float", "low": 1e-4, "high": 1e-2}
    dag = tasks({"lr": lr, "mine.margin": {"type": "float", "low": 0.0, "high": 0.1}})
    negatives = dag["train"]["inputs"]["artifacts"]["negatives"]["taskOutputArtifact"]
    assert negatives == {"producerTask": "mine-negatives", "outputArtifactKey": "negatives"}
    remine = dag["mine-negatives"]["inputs"]
    assert remine["parameters"]["overrides"]["taskOutputParameter"] == {
        "producerTask": "tune", "outputParameterKey": "best_mine_overrides"
    }  # fmt: skip
    assert remine["artifacts"]["metadata"]["taskOutputArtifact"]["producerTask"] == "split"
    assert dag["train"]["inputs"]["parameters"]["overrides"]["taskOutputParameter"] == {
        "producerTask": "tune", "outputParameterKey": "best_overrides"
    }  # fmt: skip
    plain = tasks({"lr": lr})
    assert "mine-negatives" not in plain
    negatives = plain["train"]["inputs"]["artifacts"]["negatives"]["taskOutputArtifact"]
    assert negatives["producerTask"] == "combine"
