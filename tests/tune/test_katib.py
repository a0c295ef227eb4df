"""[tune] as a Katib Experiment and [train] as a Trainer TrainJob: built through their
typed models, serialised to the shapes Katib's and Trainer's documentation give, with a
metrics filter that reads the trainer's real output and trial commands the CLI parses."""

import re

import kubernetes_validate
import pytest
import yaml
from conftest import head_train
from kubeflow_katib_api import models as katib_models
from kubeflow_trainer_api import models as trainer_models

from embedpipe.cli import main
from embedpipe.cli.stages import combine_arguments, mine_arguments, train_arguments
from embedpipe.config import ClusterSettings, ConfigError, TrainSettings, TuneSettings
from embedpipe.kube.objects import train_job
from embedpipe.train.inputs import TrainInputs
from embedpipe.tune.katib import METRIC_FILTER, build_experiment, experiment_dict

SPACE = {
    "lr": {"type": "float", "low": 1e-5, "high": 1e-2, "log": True},
    "weight_decay": {"type": "float", "low": 0.0, "high": 0.2, "step": 0.05},
    "batch_size": {"type": "categorical", "choices": [32, 64]},
    "loss": {"type": "categorical", "choices": ["infonce", "multipos_sigmoid"]},
}
CLUSTER = ClusterSettings(gpu_node_selector={"nvidia.com/gpu.product": "NVIDIA-B200"})
INPUTS = TrainInputs(images="s3://b/images", splits="s3://b/splits", negatives="s3://b/neg")
OUT = "s3://b/tune"


def _experiment(**tune) -> dict:
    settings = TuneSettings(**{"space": SPACE, "n_trials": 12, "parallel_trials": 3, **tune})
    train = TrainSettings(steps=200, val_every=20, templates=("a {concept}",))
    built = build_experiment(
        "search", settings, train, INPUTS, OUT, "reg/gpu:1", CLUSTER, "team-a",
        command=train_arguments,
    )  # fmt: skip
    assert isinstance(built, katib_models.V1beta1Experiment)
    return experiment_dict(built)


def test_the_experiment_has_the_shape_katib_documents():
    body = yaml.safe_load(yaml.safe_dump(_experiment()))  # what --dry-run prints
    assert katib_models.V1beta1Experiment.from_dict(body).to_dict() == body  # round trip
    assert (body["apiVersion"], body["kind"]) == ("kubeflow.org/v1beta1", "Experiment")
    assert body["metadata"] == {
        "name": "search", "namespace": "team-a",
        "labels": {"app.kubernetes.io/part-of": "embedpipe"},
    }  # fmt: skip
    spec = body["spec"]
    assert spec["objective"] == {
        "type": "maximize",
        "objectiveMetricName": "val_recall_at_5",
        "metricStrategies": [{"name": "val_recall_at_5", "value": "max"}],
    }
    assert spec["algorithm"]["algorithmName"] == "multivariate-tpe"
    assert (spec["parallelTrialCount"], spec["maxTrialCount"], spec["maxFailedTrialCount"]) == (
        3, 12, 3,
    )  # fmt: skip
    assert spec["metricsCollectorSpec"] == {
        "collector": {"kind": "StdOut"},
        "source": {"filter": {"metricsFormat": [METRIC_FILTER]}},
    }
    lr, decay, batch, loss = spec["parameters"]
    assert lr == {
        "name": "lr",
        "parameterType": "double",
        "feasibleSpace": {"min": "1e-05", "max": "0.01", "distribution": "logUniform"},
    }
    assert decay["feasibleSpace"] == {"min": "0", "max": "0.2", "step": "0.05",
                                      "distribution": "uniform"}  # fmt: skip
    assert batch == {"name": "batch_size", "parameterType": "categorical",
                     "feasibleSpace": {"list": ["32", "64"]}}  # fmt: skip
    assert loss["feasibleSpace"]["list"] == ["infonce", "multipos_sigmoid"]
    names = [name for name in re.findall(r"[\w.]+", str(spec)) if "metric" in name.lower()]
    assert not any(c in spec["objective"]["objectiveMetricName"] for c in "/.@"), names

    template = spec["trialTemplate"]
    assert template["primaryContainerName"] == "node"
    assert template["primaryPodLabels"]["jobset.sigs.k8s.io/replicatedjob-name"] == "node"
    references = {p["name"]: p["reference"] for p in template["trialParameters"]}
    assert references == {"lr": "lr", "weight_decay": "weight_decay", "batch_size": "batch_size",
                          "loss": "loss", "trialName": "${trialSpec.Name}"}  # fmt: skip
    job = template["trialSpec"]
    trainer_models.TrainerV1alpha1TrainJob.from_dict(job)  # a TrainJob by Trainer's own model
    assert (job["apiVersion"], job["kind"]) == ("trainer.kubeflow.org/v1alpha1", "TrainJob")
    assert job["spec"]["runtimeRef"]["name"] == "torch-distributed"
    trainer = job["spec"]["trainer"]
    assert trainer["image"] == "reg/gpu:1" and trainer["numNodes"] == 1
    assert trainer["resourcesPerNode"] == {"limits": {"nvidia.com/gpu": "1"}}
    command = trainer["command"]
    assert command[:5] == ["torchrun", "-m", "embedpipe", "train", "s3://b/images"]
    assert "s3://b/tune/${trialParameters.trialName}" in command
    for key, flag in [("lr", "lr"), ("weight_decay", "weight-decay"),
                      ("batch_size", "batch-size"), ("loss", "loss")]:  # fmt: skip
        assert f"--{flag}=${{trialParameters.{key}}}" in command
    secrets = {e["name"]: e["valueFrom"] for e in trainer["env"]}
    assert secrets["AWS_SECRET_ACCESS_KEY"] == {
        "secretKeyRef": {"name": "embedpipe-object-store", "key": "AWS_SECRET_ACCESS_KEY"}
    }
    patch = job["spec"]["runtimePatches"][0]["trainingRuntimeSpec"]["template"]["spec"]
    pod = patch["replicatedJobs"][0]["template"]["spec"]["template"]
    assert pod["metadata"]["annotations"] == {"sidecar.istio.io/inject": "false"}
    assert pod["spec"]["nodeSelector"] == {"nvidia.com/gpu.product": "NVIDIA-B200"}
    assert pod["spec"]["tolerations"] == [
        {"key": "nvidia.com/gpu", "operator": "Exists", "effect": "NoSchedule"}
    ]


def test_algorithms_and_the_batch_job_template():
    assert _experiment(algorithm="random")["spec"]["algorithm"] == {
        "algorithmName": "random", "algorithmSettings": [{"name": "random_state", "value": "0"}]
    }  # fmt: skip
    with pytest.raises(ConfigError, match=r"\[tune\].space.lr: grid search needs a step"):
        _experiment(algorithm="grid")
    grid = dict(SPACE, lr={"type": "float", "low": 0.001, "high": 0.003, "step": 0.001})
    assert _experiment(algorithm="grid", space=grid)["spec"]["algorithm"] == {
        "algorithmName": "grid"
    }
    body = _experiment(trial_template="job", trial_gpus_per_node=4)
    assert body["spec"]["trialTemplate"]["primaryContainerName"] == "training"
    job = {**body["spec"]["trialTemplate"]["trialSpec"], "metadata": {"name": "trial"}}
    kubernetes_validate.validate(job, "1.33.0", strict=True)  # a valid batch/v1 Job
    container = job["spec"]["template"]["spec"]["containers"][0]
    assert container["command"][-1] == "--nproc-per-node=4"
    assert container["resources"] == {"limits": {"nvidia.com/gpu": "4"}}
    assert job["spec"]["backoffLimit"] == 0
    assert job["spec"]["template"]["metadata"]["annotations"]["sidecar.istio.io/inject"] == "false"
    with pytest.raises(ConfigError, match="a true/false setting"):
        _experiment(space={"lock_image": {"type": "categorical", "choices": [True, False]}})


def test_the_metric_filter_reads_what_training_prints(tune_inputs, frozen_entry, tmp_path, capsys):
    """Katib's collector applies the filter to each line (Go RE2; this pattern means the
    same in Python's re): name and a value that parses as a float."""
    import json

    from embedpipe.train.stage import train_model

    capsys.readouterr()
    train_model(
        tune_inputs["images"], str(tmp_path / "m"), head_train(val_k=(1, 5)), frozen_entry,
        splits_uri=tune_inputs["splits"], embeddings_uri=tune_inputs["embeddings"],
    )  # fmt: skip
    lines = [line for line in capsys.readouterr().out.splitlines() if "val_recall_at_5=" in line]
    history = json.loads((tmp_path / "m" / ".embedpipe" / "metrics.json").read_text())["history"]
    expected = [r["val_recall_at_5"] for r in history if "val_recall_at_5" in r]
    assert len(lines) == len(expected) >= 3
    filter_ = re.compile(METRIC_FILTER)
    for line, value in zip(lines, expected, strict=True):
        found = {name: float(text) for name, text in filter_.findall(line)}
        assert found["val_recall_at_5"] == pytest.approx(value, rel=1e-5)
        assert set(found) >= {"step", "val_recall_at_1"}
    assert filter_.findall("loss=nan val_recall_at_5=1e-05") == [("val_recall_at_5", "1e-05")]


class Reached(Exception):
    pass


def test_a_trial_command_gives_the_trainer_the_settings_and_the_parameters(monkeypatch):
    """The command Katib runs, placeholders filled in, parsed by `embedpipe train` itself."""
    seen = {}

    def stub(images, out, config, entry, **kwargs):
        seen.update(images=images, out=out, config=config, **kwargs)
        raise Reached

    monkeypatch.setattr("embedpipe.train.stage.train_model", stub)
    train = head_train(model="dinov2_small", templates=("a {concept}", "{category}"), val_k=(1, 10))
    body = build_experiment(
        "s", TuneSettings(space=SPACE, metric="val_recall_at_10"), train, INPUTS, OUT, "i",
        CLUSTER, command=train_arguments,
    )  # fmt: skip
    command = experiment_dict(body)["spec"]["trialTemplate"]["trialSpec"]["spec"]["trainer"][
        "command"
    ]
    filled = {"lr": "0.0042", "weight_decay": "0.15", "batch_size": "64", "loss": "infonce",
              "trialName": "s-abc"}  # fmt: skip
    argv = [re.sub(r"\$\{trialParameters\.(\w+)\}", lambda m: filled[m[1]], a) for a in command]
    with pytest.raises(Reached):
        main(argv[3:])  # after `torchrun -m embedpipe`
    expected = train.model_copy(update={"lr": 0.0042, "weight_decay": 0.15, "batch_size": 64})
    assert seen["config"] == expected
    assert (seen["out"], seen["splits_uri"]) == ("s3://b/tune/s-abc", "s3://b/splits")


def test_a_trainjob_for_several_nodes():
    job = train_job(
        "t", "reg/gpu:1", train_arguments(INPUTS, OUT, head_train()), CLUSTER,
        num_nodes=4, gpus_per_node=8, timeout_minutes=90,
    ).to_dict()  # fmt: skip
    assert job["metadata"]["name"] == "t"
    assert job["spec"]["trainer"]["numNodes"] == 4
    assert job["spec"]["trainer"]["resourcesPerNode"]["limits"] == {"nvidia.com/gpu": "8"}
    assert job["spec"]["activeDeadlineSeconds"] == 90 * 60
    assert "--mode=head" in job["spec"]["trainer"]["command"]


def test_dry_run_prints_the_experiment_as_yaml(tmp_path, capsys):
    config = tmp_path / "c.toml"
    config.write_text(
        '[train]\nval_every = 50\n[tune]\nn_trials = 6\ntrial_template = "job"\n'
        '[tune.space]\nlr = { type = "float", low = 1e-5, high = 1e-3, log = true }\n'
    )
    argv = ["tune", "s3://b/images", "--out", "s3://b/tune", "--splits", "s3://b/splits"]
    assert main([*argv, "--config", str(config), "--backend", "katib", "--dry-run"]) in (0, None)
    printed = yaml.safe_load(capsys.readouterr().out)
    assert printed["kind"] == "Experiment" and printed["spec"]["maxTrialCount"] == 6
    assert printed["metadata"]["name"].startswith("embedpipe-tune-")
    command = printed["spec"]["trialTemplate"]["trialSpec"]["spec"]["template"]["spec"][
        "containers"
    ][0]["command"]
    assert command[:3] == ["embedpipe", "train", "s3://b/images"]
    assert "--lr=${trialParameters.lr}" in command and "--val-every=50" in command
    # the same output names the same Experiment: a rerun does not start a second search
    assert main([*argv, "--config", str(config), "--backend", "katib", "--dry-run"]) in (0, None)
    assert yaml.safe_load(capsys.readouterr().out)["metadata"] == printed["metadata"]


def test_a_trial_searching_mine_filters_re_mines_in_its_pod_then_trains_on_them(
    tune_inputs, tmp_path, monkeypatch
):
    """The Experiment carries mine.margin as the Katib parameter mine_margin; its trial
    command (``sh -c``, which Katib's collector keeps) re-mines with the assigned value and
    trains on what it mined: run here, placeholders filled in, on real data."""
    import os
    import shlex
    import subprocess
    import sys

    from test_mine_search import oracle_negatives

    from embedpipe.config import MineSettings
    from embedpipe.tune import katib
    from embedpipe.tune.study import negatives_count

    monkeypatch.setattr(katib, "TRIAL_MINING", str(tmp_path / "pod"))
    space = {
        "lr": SPACE["lr"],
        "mine.margin": {"type": "float", "low": -0.3, "high": 0.0},
        "mine.sampling": {"type": "categorical", "choices": ["top", "random"]},
    }
    inputs = TrainInputs(
        tune_inputs["images"], tune_inputs["splits"], tune_inputs["negatives"],
        tune_inputs["embeddings"],
    )  # fmt: skip
    mine = MineSettings(gpu=False, top_k=3)
    for template in ("trainjob", "job"):
        built = build_experiment(
            "s", TuneSettings(space=space, metric="val_recall_at_1", trial_template=template),
            head_train(model="dinov2_small"), inputs, str(tmp_path / "out"), "i", CLUSTER,
            command=train_arguments, mine=mine,
            mine_command=mine_arguments, combine_command=combine_arguments,
        )  # fmt: skip
        body = yaml.safe_load(yaml.safe_dump(experiment_dict(built)))
        assert katib_models.V1beta1Experiment.from_dict(body).to_dict() == body
        spec = body["spec"]
        names = [p["name"] for p in spec["parameters"]]
        assert names == ["lr", "mine_margin", "mine_sampling"]
        references = {p["name"]: p["description"] for p in spec["trialTemplate"]["trialParameters"]}
        assert references["mine_margin"] == "[mine].margin"
        trial = spec["trialTemplate"]["trialSpec"]
        if template == "job":
            job = {**trial, "metadata": {"name": "trial"}}
            kubernetes_validate.validate(job, "1.33.0", strict=True)
            command = job["spec"]["template"]["spec"]["containers"][0]["command"]
        else:
            trainer_models.TrainerV1alpha1TrainJob.from_dict(trial)
            command = trial["spec"]["trainer"]["command"]
        assert command[:2] == ["sh", "-c"] and len(command) == 3
    filled = {"lr": "0.01", "mine_margin": "-0.25", "mine_sampling": "top", "trialName": "t1"}
    line = re.sub(r"\$\{trialParameters\.(\w+)\}", lambda m: filled[m[1]], command[2])
    *setup, training = line.split(" && ")
    env = {**os.environ, "PATH": f"{os.path.dirname(sys.executable)}:{os.environ['PATH']}"}
    subprocess.run(["sh", "-c", " && ".join(setup)], check=True, env=env, capture_output=True)
    seen = {}

    def stub(images, out, config, entry, **kwargs):
        seen.update(out=out, **kwargs)
        raise Reached

    monkeypatch.setattr("embedpipe.train.stage.train_model", stub)
    argv = shlex.split(training)
    assert argv[:2] == ["embedpipe", "train"]
    with pytest.raises(Reached):
        main(argv[1:])
    assert seen["negatives_uri"] == str(tmp_path / "pod" / "negatives")
    expected = oracle_negatives(
        tune_inputs["splits"], tune_inputs["embeddings"], mine.model_copy(update={"margin": -0.25})
    )
    assert negatives_count(seen["negatives_uri"]) == expected


def test_dry_run_of_a_mine_search_needs_and_carries_the_mining_inputs(tmp_path, capsys):
    config = tmp_path / "c.toml"
    config.write_text(
        '[mine]\ntop_k = 5\n[tune]\ntrial_template = "job"\n'
        '[tune.space.mine]\nsampling = { type = "categorical", choices = ["top", "random"] }\n'
    )
    argv = ["tune", "s3://b/images", "--out", "s3://b/tune", "--splits", "s3://b/splits",
            "--config", str(config), "--backend", "katib", "--dry-run"]  # fmt: skip
    assert main(argv) not in (0, None)  # no --embeddings: nothing to re-mine from
    assert "--embeddings" in capsys.readouterr().err
    assert main([*argv, "--embeddings", "s3://b/emb"]) in (0, None)
    printed = yaml.safe_load(capsys.readouterr().out)
    container = printed["spec"]["trialTemplate"]["trialSpec"]["spec"]["template"]["spec"][
        "containers"
    ][0]
    shell, flag, line = container["command"]
    assert (shell, flag) == ("sh", "-c")
    assert line.startswith("rm -rf /tmp/embedpipe-trial-mining && embedpipe mine s3://b/splits")
    assert "--top-k=5 '--sampling=${trialParameters.mine_sampling}'" in line
    assert "embedpipe combine /tmp/embedpipe-trial-mining/mined/negatives/* --out" in line
    assert line.endswith("--negatives /tmp/embedpipe-trial-mining/negatives --nproc-per-node=1")
