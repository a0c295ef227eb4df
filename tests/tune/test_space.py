"""Invalid search spaces are one-line errors naming the key, before any trial starts."""

import pytest

from embedpipe.cli import main
from embedpipe.config import ConfigError, TrainSettings, TuneSettings, load_settings
from embedpipe.tune.space import check_search, grid_values, trial_settings


def _config(tmp_path, space: str, tune: str = "", train: str = "") -> str:
    path = tmp_path / "c.toml"
    path.write_text(f"[train]\n{train}\n[tune]\n{tune}\n[tune.space]\n{space}\n")
    return str(path)


@pytest.mark.parametrize(
    ("space", "problem"),
    [
        ('lr = { type = "float", low = 0.01, high = 0.001 }',
         r"\[tune\].space.lr: empty range: low 0.01 is not below high 0.001"),
        ('lr = { type = "float", low = 0.0, high = 0.1, log = true }',
         r"\[tune\].space.lr: log range from 0 to 0.1 reaches zero or below"),
        ('lr = { type = "float", low = -1e-3, high = 0.1, log = true }', "reaches zero or below"),
        ('loss = { type = "categorical", choices = [] }', "give at least one choice"),
        ('lr = { type = "uniform", low = 0.1, high = 1.0 }', r"\[tune\].space.lr.type"),
        ('lr = { type = "float", low = 0.1, hi = 1.0 }', r"\[tune\].space.lr.hi: unknown key"),
        ('depth = { type = "int", low = 1.5, high = 4 }', "int: low, high and step must be"),
    ],
)  # fmt: skip
def test_malformed_dimensions_fail_when_the_config_loads(tmp_path, space, problem):
    with pytest.raises(ConfigError, match=problem):
        load_settings(_config(tmp_path, space))


@pytest.mark.parametrize(
    ("space", "tune", "problem"),
    [
        ('learning_rate = { type = "float", low = 0.001, high = 0.1 }', "",
         r"\[tune\].space.learning_rate: unknown key, not a \[train\] setting"),
        ('loss = { type = "categorical", choices = ["infonce", "hinge"] }', "",
         r"\[tune\].space.loss: 'hinge' is not a valid \[train\].loss"),
        ('loss = { type = "categorical", choices = ["infonce", "triplet"] }', "",
         r"'triplet' is not a valid \[train\].loss: loss: triplet compares images"),
        ('lr = { type = "float", low = 0.0, high = 0.1 }', "",
         r"\[tune\].space.lr: 0.0 is not a valid \[train\].lr: .*greater than 0"),
        ('batch_size = { type = "float", low = 16, high = 64 }', "",
         "an integer setting takes type int"),
        ('num_nodes = { type = "int", low = 1, high = 4 }', "",
         r"\[tune\].space.num_nodes: set when the pipeline is compiled"),
        ('val_k = { type = "categorical", choices = [1] }', "",
         "a list setting takes type categorical with text choices"),
        ('val_k = { type = "categorical", choices = ["1,5"] }', "",
         r"'1,5' is not a valid \[train\].val_k"),
        ('nested_dims = { type = "categorical", choices = ["32,x"] }', "",
         r"nested_dims: '32,x' is not a comma-separated list of integers"),
        ('templates = { type = "int", low = 1, high = 2 }', "",
         "a list setting takes type categorical with text choices"),
        ('lr = { type = "float", low = 0.001, high = 0.1 }', 'metric = "val_recall_at_10"',
         r"\[tune\].metric: training never reports 'val_recall_at_10'; .* val_recall_at_1, "
         "val_recall_at_5, val_text_recall_at_1"),
        ('lr = { type = "float", low = 0.001, high = 0.1 }', 'algorithm = "grid"',
         "grid search needs a step"),
    ],
)  # fmt: skip
def test_spaces_train_rejects_fail_before_any_trial(tmp_path, space, tune, problem):
    settings = load_settings(_config(tmp_path, space, tune))
    with pytest.raises(ConfigError, match=problem):
        check_search(settings.tune, settings.train)


def test_the_command_says_what_is_wrong_in_one_line(tmp_path, capsys, monkeypatch):
    def never(*args, **kwargs):
        raise AssertionError("no trial may start")

    monkeypatch.setattr("embedpipe.train.stage.train_model", never)
    config = _config(tmp_path, 'lr = { type = "float", low = 0.001, high = 0.1 }',
                     'metric = "val_loss"')  # fmt: skip
    assert main(["tune", "images", "--out", str(tmp_path / "o"), "--config", config]) != 0
    err = capsys.readouterr().err.strip()
    assert "\n" not in err and "[tune].metric: training never reports 'val_loss'" in err
    assert not (tmp_path / "o").exists()  # nothing written either
    assert main(["tune", "images", "--out", "o", "--config", _config(tmp_path, "")]) != 0
    assert "[tune].space is empty" in capsys.readouterr().err


def test_values_are_held_as_train_holds_them():
    tune = TuneSettings(
        space={
            "batch_size": {"type": "categorical", "choices": [32.0, 64.0]},  # as KFP hands over
            "depth": {"type": "int", "low": 1, "high": 7, "step": 3},
            "weight_decay": {"type": "float", "low": 0.0, "high": 0.2, "step": 0.05},
        },
        algorithm="grid",
    )
    space = check_search(tune, TrainSettings())
    assert space["batch_size"].choices == (32, 64)
    assert all(type(c) is int for c in space["batch_size"].choices)
    assert grid_values(space["depth"]) == [1, 4, 7]
    assert grid_values(space["weight_decay"]) == pytest.approx([0.0, 0.05, 0.1, 0.15, 0.2])


def test_micro_batch_and_nested_dims_can_be_searched():
    tune = TuneSettings(
        space={
            "micro_batch": {"type": "categorical", "choices": [0, 16]},
            "nested_dims": {"type": "categorical", "choices": ["", "4,8"]},
        }
    )
    train = TrainSettings(mode="head", pairs="image_image", loss="infonce")
    space = check_search(tune, train)
    assert space["nested_dims"].choices == ("", "4,8")  # text, as Optuna and Katib hold it
    trial = trial_settings(train, {"micro_batch": 16, "nested_dims": "4,8"})
    assert (trial.micro_batch, trial.nested_dims) == (16, (4, 8))
    assert trial_settings(train, {"nested_dims": ""}).nested_dims == ()
