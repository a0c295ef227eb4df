"""`embedpipe run tune`: the Optuna search and the final training through kfp.local, on
the demo data, with three short trials."""

import json
from pathlib import Path

import pytest
from conftest import FROZEN, HEAD_TRAIN

from embedpipe.cli import main


def _toml(value) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, str):
        return f'"{value}"'
    return repr(value)


@pytest.mark.slow
def test_run_tune_trains_the_final_model_with_the_best_parameters(tune_inputs, tmp_path, capsys):
    train = "\n".join(f"{k} = {_toml(v)}" for k, v in HEAD_TRAIN.items())
    frozen = "\n".join(f"{k} = {_toml(v)}" for k, v in FROZEN.items())
    paths = "\n".join(f'{k} = "{v}"' for k, v in tune_inputs.items())
    config = tmp_path / "config.toml"
    config.write_text(
        f'[global]\npipeline_root = "{tmp_path / "runs"}"\n[paths]\n{paths}\n'
        f"[models.frozen]\n{frozen}\n[train]\n{train}\n"
        '[tune]\nn_trials = 3\nmetric = "val_recall_at_1"\nseed = 7\n'
        "[tune.space]\n"
        'lr = { type = "float", low = 0.001, high = 0.05, log = true }\n'
        'width = { type = "categorical", choices = [16, 32, 48] }\n'
        'loss = { type = "categorical", choices = ["infonce", "pairwise_sigmoid"] }\n'
    )
    main(["run", "tune", "--config", str(config)])
    outputs = {
        line.split(": ", 1)[0].strip(): line.split(": ", 1)[1]
        for line in capsys.readouterr().out.splitlines()
        if line.startswith("  ") and ": " in line
    }
    best = json.loads(Path(outputs["tune/best"]).read_text())
    trials = json.loads(Path(f"{outputs['tune/study']}/best.json").read_text())
    assert best == trials and set(best["params"]) == {"lr", "width", "loss"}
    saved = json.loads(Path(f"{outputs['train/model']}/config.json").read_text())["train"]
    assert {key: saved[key] for key in best["params"]} == best["params"]
    assert isinstance(saved["width"], int)
    assert saved["steps"] == HEAD_TRAIN["steps"]  # everything else is [train]'s
    import pyarrow.dataset as pads

    table = pads.dataset(outputs["tune/trials"]).to_table().to_pylist()
    assert len(table) == 3  # each complete, or pruned at a validation below the median
    assert max(t["value"] for t in table if t["state"] == "complete") == best["value"]
    # kfp.local keeps Output[Metrics] in the step's executor output
    executor = json.loads(Path(f"{outputs['tune/study']}/../executor_output.json").read_text())
    (metrics,) = executor["artifacts"]["metrics"]["artifacts"]
    counts = metrics["metadata"]
    assert counts["trials_complete"] + counts["trials_pruned"] == 3
    assert counts["best_value"] == best["value"]


@pytest.mark.slow
def test_run_tune_re_mines_with_the_best_filters_for_the_final_training(
    tune_inputs, tmp_path, capsys
):
    """A search of mine.margin: each trial re-mines; a mine-negatives step re-mines with the
    best margin, and the final training trains on those negatives."""
    from test_mine_search import oracle_negatives

    from embedpipe.config import MineSettings
    from embedpipe.train.run_identity import dataset_identity
    from embedpipe.tune.study import negatives_count

    settings = {**HEAD_TRAIN, "hard_negative_share": 0.25}
    train = "\n".join(f"{k} = {_toml(v)}" for k, v in settings.items())
    frozen = "\n".join(f"{k} = {_toml(v)}" for k, v in FROZEN.items())
    paths = "\n".join(f'{k} = "{v}"' for k, v in tune_inputs.items())
    config = tmp_path / "config.toml"
    config.write_text(
        f'[global]\npipeline_root = "{tmp_path / "runs"}"\n[paths]\n{paths}\n'
        f"[models.frozen]\n{frozen}\n[train]\n{train}\n"
        "[mine]\ngpu = false\n"
        '[tune]\nn_trials = 2\nmetric = "val_recall_at_1"\nalgorithm = "grid"\n'
        "pruning = false\n[tune.space]\n"
        'mine.margin = { type = "categorical", choices = [-0.25, 0.0] }\n'
    )
    code = main(["run", "tune", "--config", str(config)])
    captured = capsys.readouterr()
    assert code in (0, None), captured.err[-3000:]
    outputs = {
        line.split(": ", 1)[0].strip(): line.split(": ", 1)[1]
        for line in captured.out.splitlines()
        if line.startswith("  ") and ": " in line
    }
    best = json.loads(Path(outputs["tune/best"]).read_text())
    margin = best["params"]["mine.margin"]
    negatives = outputs["mine-negatives/negatives"]
    expected = oracle_negatives(
        tune_inputs["splits"],
        tune_inputs["embeddings"],
        MineSettings(gpu=False, margin=margin),
    )
    assert negatives_count(negatives) == expected == negatives_count(best["negatives_uri"])
    saved = json.loads(Path(f"{outputs['train/model']}/config.json").read_text())
    assert saved["inputs"]["--negatives"] == dataset_identity(negatives)
    assert "mine.margin" not in saved["train"]
