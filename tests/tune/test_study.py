"""The Optuna backend: trials train in-process, the pruner hears validations, the study
resumes after an interruption without rerunning finished trials."""

import json

import pyarrow.dataset as pads
import pytest
from conftest import head_train

from embedpipe.config import TuneSettings
from embedpipe.tune import study as tune_study
from embedpipe.tune.study import tune_model

SPACE = {
    "lr": {"type": "float", "low": 1e-3, "high": 5e-2, "log": True},
    "width": {"type": "categorical", "choices": [16, 32]},
}


def _inputs(tune_inputs):
    return {
        "splits_uri": tune_inputs["splits"],
        "embeddings_uri": tune_inputs["embeddings"],
        "negatives_uri": tune_inputs["negatives"],
    }


def test_a_study_writes_trials_best_and_report(tune_inputs, frozen_entry, tmp_path):
    tune = TuneSettings(space=SPACE, n_trials=3, metric="val_recall_at_1", pruning=False)
    result = tune_model(
        tune_inputs["images"],
        str(tmp_path / "t"),
        tune,
        head_train(),
        frozen_entry,
        **_inputs(tune_inputs),
    )
    assert result.trials_complete == 3 and result.trials_run_now == 3
    trials = pads.dataset(str(tmp_path / "t" / "trials")).to_table().to_pylist()
    assert [t["number"] for t in trials] == [0, 1, 2]
    best = json.loads((tmp_path / "t" / "best.json").read_text())
    assert best["value"] == max(t["value"] for t in trials)
    assert set(best["params"]) == {"lr", "width"}
    for trial in trials:  # the value is the trial's best validation after step 0
        metrics = json.loads(
            (
                tmp_path
                / "t"
                / "runs"
                / f"trial-{trial['number']:04d}"
                / ".embedpipe"
                / "metrics.json"
            ).read_text()
        )
        values = [
            r["val_recall_at_1"]
            for r in metrics["history"]
            if r["step"] > 0 and "val_recall_at_1" in r
        ]
        assert trial["value"] == pytest.approx(max(values))
    assert (tmp_path / "t" / "history.png").read_bytes()[:4] == b"\x89PNG"
    assert "data:image/png;base64" in (tmp_path / "t" / "report.html").read_text()


@pytest.mark.parametrize("stop", [KeyboardInterrupt, SystemExit], ids=["ctrl-c", "killed"])
def test_an_interrupted_study_resumes_without_rerunning_finished_trials(
    stop, tune_inputs, frozen_entry, tmp_path, monkeypatch
):
    """Ctrl-C ends a trial as failed; a kill (SystemExit here: Optuna lets it through
    without recording anything) leaves it running. Either way the rerun keeps the finished
    trials, runs the interrupted one again in its folder, then the rest."""
    import optuna

    from embedpipe.train import stage

    real, calls = stage.train_model, []

    def train(images, out, config, entry, **kwargs):
        calls.append((out, config.lr))
        if len(calls) == 3:
            raise stop
        return real(images, out, config, entry, **kwargs)

    monkeypatch.setattr(stage, "train_model", train)
    tune = TuneSettings(space=SPACE, n_trials=4, metric="val_recall_at_1", pruning=False)
    out = tmp_path / "t"
    run = lambda: tune_model(  # noqa: E731
        tune_inputs["images"], str(out), tune, head_train(), frozen_entry, **_inputs(tune_inputs)
    )
    with pytest.raises(stop):
        run()
    url = f"sqlite:///{out}/.embedpipe/study.db"
    before = optuna.load_study(study_name=tune_study.STUDY_NAME, storage=url).trials
    assert [t.state.name for t in before] == [
        "COMPLETE", "COMPLETE", "FAIL" if stop is KeyboardInterrupt else "RUNNING"
    ]  # fmt: skip

    calls.clear()
    result = run()
    assert result.trials_complete == 4 and result.trials_run_now == 2
    assert calls[0] == (str(out / "runs" / "trial-0002"), before[2].params["lr"])  # same folder
    trials = pads.dataset(str(out / "trials")).to_table().to_pylist()
    assert [t["state"] for t in trials] == ["complete", "complete", "fail", "complete", "complete"]
    assert [t["interrupted"] for t in trials] == [False, False, True, False, False]
    assert [t["value"] for t in trials[:2]] == [before[0].value, before[1].value]
    assert trials[3]["param_lr"] == before[2].params["lr"]
    assert sum(t["state"] == "complete" and not t["interrupted"] for t in trials) == tune.n_trials


def test_validations_feed_the_median_pruner(tune_inputs, frozen_entry, tmp_path, monkeypatch):
    """Trial 0 validates at 0.9; trial 1 reports 0.1 at its first validation and stops there."""
    from embedpipe.core import storage
    from embedpipe.train import stage

    scripted = iter([[0.9, 0.9, 0.9], [0.1, 0.1, 0.1]])

    def train(images, out, config, entry, on_validation=None, **kwargs):
        history = []
        for step, value in zip((2, 4, 6), next(scripted), strict=True):
            on_validation(step, {"val_recall_at_1": value})
            history.append({"step": step, "val_recall_at_1": value})
        storage.write_json(f"{out}/.embedpipe/metrics.json", {"history": history})

    monkeypatch.setattr(stage, "train_model", train)
    tune = TuneSettings(space=SPACE, n_trials=2, metric="val_recall_at_1", pruning_startup_trials=1)
    result = tune_model(
        tune_inputs["images"], str(tmp_path / "t"), tune, head_train(), frozen_entry,
        **_inputs(tune_inputs),
    )  # fmt: skip
    assert (result.trials_complete, result.trials_pruned) == (1, 1)
    trials = pads.dataset(str(tmp_path / "t" / "trials")).to_table().to_pylist()
    assert [(t["state"], t["last_step"]) for t in trials] == [("complete", 6), ("pruned", 2)]
    assert result.best_value == pytest.approx(0.9)


def test_too_many_failed_trials_fail_the_study_with_the_last_error(
    tune_inputs, frozen_entry, tmp_path, monkeypatch
):
    from embedpipe.train import stage

    calls = []

    def train(images, out, config, entry, **kwargs):
        calls.append(config.lr)
        raise FloatingPointError(f"loss is nan at lr {config.lr:.3g}")

    monkeypatch.setattr(stage, "train_model", train)
    tune = TuneSettings(space=SPACE, n_trials=6, max_failed_trials=1)
    with pytest.raises(
        RuntimeError,
        match=r"2 trials failed, more than \[tune\].max_failed_"
        r"trials 1; the last: trial 1: FloatingPointError: loss is nan at lr",
    ):
        tune_model(
            tune_inputs["images"], str(tmp_path / "t"), tune, head_train(), frozen_entry,
            **_inputs(tune_inputs),
        )  # fmt: skip
    assert len(calls) == 2  # stopped there, not after all six
