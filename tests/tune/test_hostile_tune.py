"""Tuning under hostile input: a resumed study proposes no finished parameter set again,
a second tune of one folder is refused, a grid step past its range is an error."""

import optuna
import pytest
from conftest import head_train, lock_held_elsewhere

from embedpipe.config import ConfigError, TuneSettings
from embedpipe.core import storage
from embedpipe.tune import study as tune_study
from embedpipe.tune.space import check_search
from embedpipe.tune.study import tune_model

SPACE = {
    "lr": {"type": "float", "low": 1e-3, "high": 5e-2, "log": True},
    "width": {"type": "int", "low": 16, "high": 64, "step": 16},
}


def _scripted_training(monkeypatch, calls: list, stop_at: int | None = None):
    """Trials that 'train' at once: the value is a function of the parameters."""
    from embedpipe.train import stage

    def train(images, out, config, entry, on_validation=None, **kwargs):
        calls.append((config.lr, config.width))
        if stop_at is not None and len(calls) == stop_at:
            raise SystemExit(9)  # as kill -9: Optuna records nothing, the trial stays RUNNING
        value = config.lr * 10 + config.width / 100
        on_validation(2, {"val_recall_at_1": value})
        storage.write_json(
            f"{out}/.embedpipe/metrics.json", {"history": [{"step": 2, "val_recall_at_1": value}]}
        )

    monkeypatch.setattr(stage, "train_model", train)


@pytest.mark.parametrize("algorithm", ["random", "tpe"])
def test_a_resumed_study_proposes_no_finished_parameter_set_again(
    algorithm, tune_inputs, frozen_entry, tmp_path, monkeypatch
):
    tune = TuneSettings(
        space=SPACE, n_trials=6, metric="val_recall_at_1", pruning=False, algorithm=algorithm
    )
    out = tmp_path / "t"
    calls: list = []
    run = lambda: tune_model(  # noqa: E731
        tune_inputs["images"], str(out), tune, head_train(), frozen_entry,
        splits_uri=tune_inputs["splits"], embeddings_uri=tune_inputs["embeddings"],
    )  # fmt: skip
    _scripted_training(monkeypatch, calls, stop_at=4)
    with pytest.raises(SystemExit):
        run()
    _scripted_training(monkeypatch, calls)
    run()
    url = f"sqlite:///{out}/.embedpipe/study.db"
    trials = optuna.load_study(study_name=tune_study.STUDY_NAME, storage=url).trials
    killed = trials[3]
    assert killed.state.name == "FAIL" and killed.user_attrs.get("interrupted")
    finished = [t for t in trials if t.state.name == "COMPLETE"]
    assert len(finished) == 6
    rerun = [t for t in finished if t.user_attrs.get("resumes") == 3]
    assert [t.params for t in rerun] == [killed.params]  # the interrupted one, again
    fresh = [tuple(sorted(t.params.items())) for t in finished if t not in rerun]
    assert len(set(fresh)) == len(fresh), fresh  # no finished parameter set proposed again


def test_a_second_tune_of_one_folder_is_refused_naming_the_lock(
    tune_inputs, frozen_entry, tmp_path, monkeypatch
):
    from embedpipe.core.locks import OutputLockedError

    calls: list = []
    _scripted_training(monkeypatch, calls)
    out = tmp_path / "t"
    tune = TuneSettings(space=SPACE, n_trials=2, metric="val_recall_at_1", pruning=False)
    with lock_held_elsewhere(out) as (pid, _):
        with pytest.raises(OutputLockedError, match=rf"pid {pid}"):
            tune_model(
                tune_inputs["images"], str(out), tune, head_train(), frozen_entry,
                splits_uri=tune_inputs["splits"], embeddings_uri=tune_inputs["embeddings"],
            )  # fmt: skip
        assert calls == [] and not (out / ".embedpipe" / "study.db").exists()
    result = tune_model(
        tune_inputs["images"], str(out), tune, head_train(), frozen_entry,
        splits_uri=tune_inputs["splits"], embeddings_uri=tune_inputs["embeddings"],
    )  # fmt: skip
    assert result.trials_complete == 2 and not (out / ".embedpipe" / "lock").exists()


@pytest.mark.parametrize("algorithm", ["grid", "random"])
def test_a_step_larger_than_its_range_is_an_error_of_the_space(algorithm):
    space = {"width": {"type": "int", "low": 16, "high": 32, "step": 64}}
    tune = TuneSettings(space=space, algorithm=algorithm, metric="val_recall_at_1")
    with pytest.raises(ConfigError, match=r"\[tune\].space.width: step 64 is larger than the "
                       r"range 16...32"):  # fmt: skip
        check_search(tune, head_train())
    floats = {"lr": {"type": "float", "low": 0.001, "high": 0.01, "step": 0.05}}
    with pytest.raises(ConfigError, match=r"space.lr: step 0.05 is larger than the range"):
        check_search(TuneSettings(space=floats, algorithm=algorithm), head_train())
    fine = {"width": {"type": "int", "low": 16, "high": 32, "step": 16}}
    assert check_search(TuneSettings(space=fine, algorithm=algorithm), head_train())
