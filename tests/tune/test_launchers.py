"""The launcher components against a loopback Kubernetes API: they create their object
under a deterministic name, follow its status to the end, fail with its own reason, and
re-attach to an object a previous attempt created."""

import json
import types

import pytest
import yaml
from conftest import head_train
from kube_api import KubeServer

from embedpipe.components.train import train_job
from embedpipe.components.tune import tune_katib
from embedpipe.config import (
    ClusterSettings,
    CombineSettings,
    MineSettings,
    TrainSettings,
    TuneSettings,
)
from embedpipe.kube.api import KubeError
from embedpipe.kube.objects import object_name

SPACE = {
    "lr": {"type": "float", "low": 1e-4, "high": 1e-1, "log": True},
    "batch_size": {"type": "int", "low": 16, "high": 64, "step": 16},
    "loss": {"type": "categorical", "choices": ["infonce", "pairwise_sigmoid"]},
}


class Metrics:
    def __init__(self):
        self.logged = {}

    def log_metric(self, name, value):
        self.logged[name] = value


def _artifact(path, uri=None):
    return types.SimpleNamespace(path=str(path), uri=str(uri or path), metadata={})


def _datasets(tmp_path):
    return {
        name: _artifact(tmp_path / name, f"s3://bucket/runs/{name}")
        for name in ("images", "splits", "negatives", "embeddings")
    }


def _experiment_status(kind, **extra):
    return {"conditions": [{"type": kind, "status": "True", "reason": f"Experiment{kind}"}],
            **extra}  # fmt: skip


SUCCEEDED = _experiment_status(
    "Succeeded",
    trials=4,
    trialsSucceeded=4,
    currentOptimalTrial={
        "bestTrialName": "trial-b",
        "parameterAssignments": [
            {"name": "lr", "value": "0.0123"},
            {"name": "batch_size", "value": "48"},
            {"name": "loss", "value": "pairwise_sigmoid"},
        ],
        "observation": {
            "metrics": [{"name": "val_recall_at_5", "latest": "0.7", "max": "0.8", "min": "0.5"}]
        },
    },
)


def _run_tune(tmp_path, tune=None, train_overrides=None, mine_overrides=None):
    best, metrics = _artifact(tmp_path / "best.json"), Metrics()
    tune = tune or TuneSettings(space=SPACE, n_trials=4, poll_seconds=0.01)
    outputs = tune_katib(
        **_datasets(tmp_path),
        settings=tune.model_dump(mode="json"),
        overrides={},
        train_settings=TrainSettings(steps=50, val_every=10).model_dump(mode="json"),
        train_overrides=train_overrides or {"epochs": 3},
        mine_settings=MineSettings().model_dump(mode="json", exclude_none=True),
        mine_overrides=mine_overrides or {},
        combine_settings=CombineSettings().model_dump(mode="json"),
        combine_overrides={},
        trial_image="registry.example/embedpipe-gpu:9",
        cluster=ClusterSettings().model_dump(mode="json"),
        run_id="run-123",
        task_name="tune-katib",
        trials=_artifact(tmp_path / "trials", "s3://bucket/runs/trials"),
        best=best,
        metrics=metrics,
    )
    return outputs, json.loads((tmp_path / "best.json").read_text()), metrics


def test_the_katib_launcher_follows_its_experiment_to_the_best_parameters(tmp_path, monkeypatch):
    name = object_name("embedpipe-tune", "run-123", "tune-katib")
    with KubeServer(tmp_path, monkeypatch) as server:
        running = {"conditions": [{"type": "Running", "status": "True"}], "trials": 2,
                   "trialsRunning": 2}  # fmt: skip
        server.state.statuses[("experiments", name)] = [running, running, SUCCEEDED]
        outputs, best, metrics = _run_tune(tmp_path)
    (created,) = server.state.created
    assert created["kind"] == "Experiment" and created["metadata"]["name"] == name
    assert created["spec"]["maxTrialCount"] == 4
    trainer = created["spec"]["trialTemplate"]["trialSpec"]["spec"]["trainer"]
    assert trainer["image"] == "registry.example/embedpipe-gpu:9"
    assert "s3://bucket/runs/images" in trainer["command"]
    assert "--epochs=3" in trainer["command"]  # the run's [train] overrides reach the trials
    paths = [path for method, path in server.state.requests if method == "POST"]
    assert paths == ["/apis/kubeflow.org/v1beta1/namespaces/team-a/experiments"]
    assert any("trials?labelSelector=katib.kubeflow.org" in p for _, p in server.state.requests)
    # typed as [train] holds them, on top of the run's overrides
    assert outputs.best_overrides == {
        "epochs": 3, "lr": 0.0123, "batch_size": 48, "loss": "pairwise_sigmoid"
    }  # fmt: skip
    assert isinstance(outputs.best_overrides["batch_size"], int)
    assert best["value"] == 0.8 and best["trial"] == "trial-b"
    assert best["out_uri"] == "s3://bucket/runs/trials/trial-b"
    assert metrics.logged["best_lr"] == 0.0123 and metrics.logged["trials_succeeded"] == 4


def test_the_katib_launcher_splits_the_best_mine_filters_from_train(tmp_path, monkeypatch):
    name = object_name("embedpipe-tune", "run-123", "tune-katib")
    space = {**SPACE, "mine.margin": {"type": "float", "low": 0.0, "high": 0.2}}
    status = json.loads(json.dumps(SUCCEEDED))
    assignments = status["currentOptimalTrial"]["parameterAssignments"]
    assignments.append({"name": "mine_margin", "value": "0.05"})
    with KubeServer(tmp_path, monkeypatch) as server:
        server.state.statuses[("experiments", name)] = [status]
        tune = TuneSettings(space=space, n_trials=4, poll_seconds=0.01)
        outputs, best, _ = _run_tune(tmp_path, tune, mine_overrides={"top_k": 5})
    (created,) = server.state.created
    assert {p["name"] for p in created["spec"]["parameters"]} == {
        "lr", "batch_size", "loss", "mine_margin"
    }  # fmt: skip
    command = created["spec"]["trialTemplate"]["trialSpec"]["spec"]["trainer"]["command"]
    assert command[:2] == ["sh", "-c"]
    assert "'--margin=${trialParameters.mine_margin}'" in command[2]
    assert "--top-k=5" in command[2]  # the run's [mine] overrides reach the trials
    assert outputs.best_overrides == {
        "epochs": 3, "lr": 0.0123, "batch_size": 48, "loss": "pairwise_sigmoid"
    }  # fmt: skip
    assert outputs.best_mine_overrides == {"top_k": 5, "margin": 0.05}
    assert best["params"]["mine.margin"] == 0.05


def test_the_katib_launcher_fails_with_the_experiments_reason(tmp_path, monkeypatch):
    name = object_name("embedpipe-tune", "run-123", "tune-katib")
    failed = {
        "conditions": [
            {"type": "Running", "status": "False"},
            {
                "type": "Failed",
                "status": "True",
                "reason": "ExperimentMaxFailedTrialsReached",
                "message": "Experiment has failed because max failed count has reached",
            },
        ],
        "trials": 4,
        "trialsFailed": 4,
    }
    with KubeServer(tmp_path, monkeypatch) as server:
        server.state.statuses[("experiments", name)] = [failed]
        with pytest.raises(KubeError, match="ExperimentMaxFailedTrialsReached: Experiment has"):
            _run_tune(tmp_path)


def test_a_retried_launcher_re_attaches_to_its_experiment(tmp_path, monkeypatch):
    name = object_name("embedpipe-tune", "run-123", "tune-katib")
    with KubeServer(tmp_path, monkeypatch) as server:
        server.state.statuses[("experiments", name)] = [SUCCEEDED]
        _run_tune(tmp_path)  # the first attempt created it, then its pod died
        server.state.created.clear()
        outputs, best, _ = _run_tune(tmp_path)
        assert server.state.created == []  # no second search
        assert best["trial"] == "trial-b" and outputs.best_overrides["lr"] == 0.0123
        # the same name made from another spec is not silently followed
        with pytest.raises(KubeError, match=r"exists .* with another spec"):
            _run_tune(tmp_path, train_overrides={"epochs": 4})


def test_a_search_that_outlives_its_timeout_is_deleted(tmp_path, monkeypatch):
    name = object_name("embedpipe-tune", "run-123", "tune-katib")
    tune = TuneSettings(space=SPACE, poll_seconds=0.01, timeout_minutes=1)
    clock = iter(range(0, 10_000, 30))
    monkeypatch.setattr("embedpipe.kube.api.now", lambda: next(clock))
    with KubeServer(tmp_path, monkeypatch) as server:
        server.state.statuses[("experiments", name)] = [{"conditions": []}]
        with pytest.raises(KubeError, match="did not finish within 1 min; deleted it"):
            _run_tune(tmp_path, tune=tune)
        assert server.state.deleted == [("experiments", name)]


def _run_train_job(tmp_path, model_path, timeout_minutes=60):
    model, metrics, report = _artifact(model_path), Metrics(), _artifact(tmp_path / "r.html")
    train_job(
        **_datasets(tmp_path),
        settings=head_train(num_nodes=4, accelerator_limit=8).model_dump(mode="json"),
        overrides={"lr": 0.02},
        trainer_image="registry.example/embedpipe-gpu:9",
        cluster=ClusterSettings(
            gpu_node_selector={"pool": "b200"},
            launcher_poll_seconds=0.01,
            launcher_timeout_minutes=timeout_minutes,
        ).model_dump(mode="json"),
        run_id="run-9",
        task_name="train-job",
        model=model,
        metrics=metrics,
        report=report,
    )
    return model, metrics, report


def test_the_train_job_launcher_runs_a_multi_node_trainjob(tmp_path, monkeypatch):
    name = object_name("embedpipe-train", "run-9", "train-job")
    model_path = tmp_path / "model"

    def finish(plural, obj_name, status):  # what rank 0 of the job writes at the end
        if any(c["type"] == "Complete" for c in status.get("conditions", [])):
            (model_path / ".embedpipe").mkdir(parents=True, exist_ok=True)
            result = {"steps": 6, "best_metric": "val_recall_at_1", "best_value": 0.5}
            (model_path / ".embedpipe" / "metrics.json").write_text(
                json.dumps({"result": result, "history": [], "curves": {}})
            )

    with KubeServer(tmp_path, monkeypatch) as server:
        server.state.on_status = finish
        running = {"conditions": [{"type": "Created", "status": "True"}],
                   "jobsStatus": [{"name": "node", "active": 4, "ready": 4}]}  # fmt: skip
        done = {"conditions": [{"type": "Complete", "status": "True", "reason": "JobsCompleted"}]}
        server.state.statuses[("trainjobs", name)] = [running, done]
        model, metrics, _ = _run_train_job(tmp_path, model_path)
    (job,) = server.state.created
    assert server.state.requests[0] == (
        "POST", "/apis/trainer.kubeflow.org/v1alpha1/namespaces/team-a/trainjobs"
    )  # fmt: skip
    assert job["metadata"]["name"] == name
    trainer = job["spec"]["trainer"]
    assert trainer["numNodes"] == 4
    assert trainer["resourcesPerNode"] == {"limits": {"nvidia.com/gpu": "8"}}
    assert trainer["command"][:4] == ["torchrun", "-m", "embedpipe", "train"]
    assert "--lr=0.02" in trainer["command"] and str(model_path) in trainer["command"]
    patch = job["spec"]["runtimePatches"][0]["trainingRuntimeSpec"]["template"]["spec"]
    pod = patch["replicatedJobs"][0]["template"]["spec"]["template"]
    assert pod["spec"]["nodeSelector"] == {"pool": "b200"}
    assert metrics.logged["steps"] == 6 and model.metadata["train_job"] == name
    assert "Training" in (tmp_path / "r.html").read_text()


def test_the_train_job_launcher_fails_with_the_jobs_reason(tmp_path, monkeypatch):
    name = object_name("embedpipe-train", "run-9", "train-job")
    failed = {
        "conditions": [
            {"type": "Failed", "status": "True", "reason": "JobSetFailed",
             "message": "jobset node-0 failed: BackoffLimitExceeded"}
        ]
    }  # fmt: skip
    with KubeServer(tmp_path, monkeypatch) as server:
        server.state.statuses[("trainjobs", name)] = [failed]
        with pytest.raises(KubeError, match=r"TrainJob .* failed: JobSetFailed: jobset node-0"):
            _run_train_job(tmp_path, tmp_path / "model")


def test_a_train_job_that_outlives_its_timeout_is_deleted(tmp_path, monkeypatch):
    name = object_name("embedpipe-train", "run-9", "train-job")
    clock = iter(range(0, 10_000, 30))
    monkeypatch.setattr("embedpipe.kube.api.now", lambda: next(clock))
    with KubeServer(tmp_path, monkeypatch) as server:
        server.state.statuses[("trainjobs", name)] = [{"conditions": []}]
        with pytest.raises(KubeError, match=r"TrainJob .* did not finish within 2 min"):
            _run_train_job(tmp_path, tmp_path / "model", timeout_minutes=2)
        assert server.state.deleted == [("trainjobs", name)]


def test_the_launchers_need_no_more_than_the_role_grants(tmp_path, monkeypatch):
    """Every call the launchers make, in every test above's situations, is one the Role in
    manifests/base grants (and the Role grants nothing they do not call)."""
    from pathlib import Path

    role = yaml.safe_load(
        (Path(__file__).parents[2] / "manifests/base/katib-launcher-role.yaml").read_text()
    )
    granted = {
        (group, resource, verb)
        for rule in role["rules"]
        for group in rule["apiGroups"]
        for resource in rule["resources"]
        for verb in rule["verbs"]
    }
    made = set()
    for test in (
        test_the_katib_launcher_follows_its_experiment_to_the_best_parameters,
        test_a_retried_launcher_re_attaches_to_its_experiment,
        test_a_search_that_outlives_its_timeout_is_deleted,
        test_the_train_job_launcher_runs_a_multi_node_trainjob,
        test_a_train_job_that_outlives_its_timeout_is_deleted,
    ):
        folder = tmp_path / test.__name__
        folder.mkdir()
        servers = []
        real = KubeServer.__enter__

        def remember(self, real=real, servers=servers):
            servers.append(self)
            return real(self)

        with monkeypatch.context() as patch:
            patch.setattr(KubeServer, "__enter__", remember)
            test(folder, patch)
        for server in servers:
            for method, path in server.state.requests:
                parts = path.split("?")[0].split(
                    "/"
                )  # /apis/GROUP/VERSION/namespaces/NS/PLURAL[/NAME]
                verb = {"POST": "create", "DELETE": "delete"}.get(method)
                verb = verb or ("get" if len(parts) == 8 else "list")
                made.add((parts[2], parts[6], verb))
    assert made == granted
