"""make deploy and submit: rendering the overlays, and the KFP API contract, against a
loopback server answering the v2beta1 endpoints, driven by the real kfp client and CLI."""

import base64
import os
import shutil
import subprocess
import sys
from pathlib import Path

import kubernetes_validate
import pytest
import yaml
from kfp_api import FakeKfpApi

from embedpipe.cli import main
from embedpipe.config import ConfigError
from embedpipe.pipelines import deploy, submit

ROOT = Path(__file__).resolve().parents[2]
MANIFESTS = ROOT / "manifests"
OVERLAYS = sorted(p.name for p in (MANIFESTS / "overlays").iterdir())
CREDENTIALS = {"AWS_ACCESS_KEY_ID": "AKIATESTKEY", "AWS_SECRET_ACCESS_KEY": "s3cr3t-value"}
needs_kubectl = pytest.mark.skipif(shutil.which("kubectl") is None, reason="kubectl not installed")


@pytest.fixture(autouse=True)
def kfp_home(tmp_path, monkeypatch):
    """kfp.Client keeps a context file under $HOME; keep it out of the user's."""
    monkeypatch.setenv("HOME", str(tmp_path / "home"))


@pytest.fixture(scope="module")
def compiled(gpu_cloud_build):
    return gpu_cloud_build


def documents(text):
    return [doc for doc in yaml.safe_load_all(text) if doc]


@needs_kubectl
@pytest.mark.parametrize("env", OVERLAYS)
def test_each_overlay_renders_valid_core_objects_with_the_secret_generated(env):
    tree_before = sorted(MANIFESTS.rglob("*"))
    rendered = deploy.render(MANIFESTS, env, CREDENTIALS)
    assert sorted(MANIFESTS.rglob("*")) == tree_before  # credentials only in a temporary copy
    objects = {(doc["kind"], doc["metadata"]["name"]): doc for doc in documents(rendered)}
    for doc in objects.values():
        kubernetes_validate.validate(doc, "1.33.0", strict=True)
    secret = objects[("Secret", "embedpipe-object-store")]
    decoded = {k: base64.b64decode(v).decode() for k, v in secret["data"].items()}
    assert decoded == CREDENTIALS
    settings = objects[("ConfigMap", "embedpipe-settings")]["data"]
    assert {"AWS_ENDPOINT_URL_S3", "AWS_REGION", "EMBEDPIPE_PIPELINE_ROOT"} <= set(settings)
    role = objects[("Role", "embedpipe-katib-launcher")]
    granted = {(r["resources"][0], verb) for r in role["rules"] for verb in r["verbs"]}
    # exactly the calls of the launchers (tests/tune/test_launchers.py checks they stay so)
    assert granted == {
        ("experiments", "create"), ("experiments", "get"), ("experiments", "delete"),
        ("trials", "list"),
        ("trainjobs", "create"), ("trainjobs", "get"), ("trainjobs", "delete"),
    }  # fmt: skip
    assert not any(
        resource in ("secrets", "pods", "*")
        for rule in role["rules"]
        for resource in rule["resources"]
    )
    binding = objects[("RoleBinding", "embedpipe-katib-launcher")]
    assert {"kind": "ServiceAccount", "name": "embedpipe-runner"}.items() <= binding["subjects"][
        0
    ].items()
    assert len(binding["subjects"]) == 2  # plus the service account KFP runs pods as
    namespaces = {doc["metadata"].get("namespace") for doc in objects.values()} - {None}
    assert len(namespaces) == 1


@needs_kubectl
def test_redacted_output_hides_every_secret_value():
    redacted = deploy.redact(deploy.render(MANIFESTS, "gpu-cloud", CREDENTIALS))
    for value in CREDENTIALS.values():
        assert value not in redacted
        assert base64.b64encode(value.encode()).decode() not in redacted
    assert "embedpipe-object-store" in redacted


def test_credentials_come_from_a_file_or_the_environment_with_clear_errors(tmp_path):
    manifests = tmp_path / "manifests"
    (manifests / "base").mkdir(parents=True)
    assert deploy.object_store_credentials(manifests, None, CREDENTIALS) == CREDENTIALS
    with pytest.raises(ConfigError, match="export AWS_ACCESS_KEY_ID and AWS_SECRET_ACCESS_KEY"):
        deploy.object_store_credentials(manifests, None, {"AWS_ACCESS_KEY_ID": "x"})
    given = tmp_path / "creds.env"
    given.write_text("# mine\nAWS_ACCESS_KEY_ID=from-file\n")
    with pytest.raises(ConfigError, match=r"creds.env: missing AWS_SECRET_ACCESS_KEY"):
        deploy.object_store_credentials(manifests, str(given), {})
    given.write_text("AWS_ACCESS_KEY_ID=a\nnot a pair\n")
    with pytest.raises(ConfigError, match=r"creds.env:2: expected KEY=VALUE"):
        deploy.object_store_credentials(manifests, str(given), {})
    with pytest.raises(ConfigError, match=r"nope\.env: credentials file not found"):
        deploy.object_store_credentials(manifests, str(tmp_path / "nope.env"), {})
    (manifests / "base" / "object-store.env").write_text(
        "AWS_ACCESS_KEY_ID=k\nAWS_SECRET_ACCESS_KEY=s\n"
    )
    assert deploy.object_store_credentials(manifests, None, CREDENTIALS)["AWS_ACCESS_KEY_ID"] == "k"


def test_a_credential_with_a_line_break_is_refused():
    smuggled = {**CREDENTIALS, "AWS_SECRET_ACCESS_KEY": "x\nEXTRA=1"}
    with pytest.raises(ConfigError, match=r"AWS_SECRET_ACCESS_KEY: .*line break"):
        deploy.render(MANIFESTS, "local", smuggled)


def test_an_unknown_overlay_names_the_known_ones():
    with pytest.raises(ConfigError, match=r"no such overlay \(known: gpu-cloud, local\)"):
        deploy.overlay_dir(MANIFESTS, "staging")


@needs_kubectl
def test_deploy_dry_run_prints_manifests_and_uploads_without_a_cluster(
    tmp_path, capsys, monkeypatch
):
    config = tmp_path / "cluster.toml"
    build = tmp_path / "build"
    config.write_text(
        (ROOT / "configs" / "cluster.toml").read_text() + f'\n[global]\nbuild_dir = "{build}"\n'
    )
    for key, value in CREDENTIALS.items():
        monkeypatch.setenv(key, value)
    code = main(["deploy", "gpu-cloud", "--config", str(config), "--dry-run"])
    printed = capsys.readouterr().out
    assert code == 0
    assert "s3cr3t-value" not in printed and "AKIATESTKEY" not in printed
    revision = deploy.git_revision(ROOT)
    for name in ("preprocess", "mine"):
        assert (build / f"{name}.yaml").is_file()
        line = f"would upload {build / name}.yaml as pipeline embedpipe-{name}, version {revision}"
        assert line in printed
    kinds = {doc["kind"] for doc in documents(printed.split("\n# would upload")[0])}
    assert kinds == {"Namespace", "ServiceAccount", "Role", "RoleBinding", "ConfigMap", "Secret"}


def test_upload_creates_each_pipeline_once_and_adds_a_version_per_revision(compiled):
    import kfp

    packages = [compiled / "preprocess.yaml", compiled / "mine.yaml"]
    with FakeKfpApi() as api:
        first = deploy.upload_pipelines(lambda: kfp.Client(host=api.url), packages, "abc123")
        second = deploy.upload_pipelines(lambda: kfp.Client(host=api.url), packages, "def456")
        pipelines = {p["display_name"] for p in api.state.pipelines.values()}
        versions = sorted(
            (api.state.pipelines[v["pipeline_id"]]["display_name"], v["display_name"])
            for v in api.state.versions.values()
        )
        uploaded = [u["content"] for u in api.state.uploads if u["path"].endswith("version")]
    assert pipelines == {"embedpipe-preprocess", "embedpipe-mine"}
    assert [u.pipeline_id for u in first] == [u.pipeline_id for u in second]
    assert versions == [
        ("embedpipe-mine", "abc123"),
        ("embedpipe-mine", "def456"),
        ("embedpipe-preprocess", "abc123"),
        ("embedpipe-preprocess", "def456"),
    ]
    assert uploaded[0] == packages[0].read_bytes()


def test_uploading_a_revision_twice_and_an_unreachable_endpoint_are_clear_errors(compiled, capsys):
    import kfp

    packages = [compiled / "mine.yaml"]
    with FakeKfpApi() as api:
        deploy.upload_pipelines(lambda: kfp.Client(host=api.url), packages, "abc123")
        with pytest.raises(RuntimeError, match=r"mine version abc123 failed: HTTP 409.*already"):
            deploy.upload_pipelines(lambda: kfp.Client(host=api.url), packages, "abc123")
    argv = ["submit", "mine", "--host", "http://127.0.0.1:9", "--build-dir", str(compiled)]
    argv += ["--param", "images_uri=a", "--param", "metadata_uri=b", "--param", "embeddings_uri=c"]
    assert main(argv) == 1
    assert "cannot reach the KFP API at http://127.0.0.1:9" in capsys.readouterr().err


def submitted_run(api):
    (run,) = api.state.runs.values()
    (experiment,) = api.state.experiments.values()
    assert run["experiment_id"] == experiment["experiment_id"]
    return run, experiment


def test_kfp_run_submit_sends_our_pipeline_spec_and_parameters(compiled, tmp_path):
    """The contract: the real `kfp` CLI, our compiled YAML, a loopback KFP API."""
    package = compiled / "preprocess.yaml"
    spec, platform = yaml.safe_load_all(package.read_text())
    kfp_cli = Path(sys.executable).parent / "kfp"
    with FakeKfpApi() as api:
        result = subprocess.run(
            [
                *(str(kfp_cli), "--endpoint", api.url, "run", "submit", "-e", "embedpipe-ci"),
                *("-r", "nightly", "-f", str(package)),
                *(
                    'sources=["s3://raw/flowers", "s3://raw/birds.tar"]',
                    'dedup={"max_distance": 4}',
                ),
            ],
            capture_output=True,
            text=True,
            timeout=120,
            env={**os.environ, "HOME": str(tmp_path)},
        )
        assert result.returncode == 0, result.stderr
        run, experiment = submitted_run(api)
        assert ("GET", "/apis/v2beta1/healthz") in api.state.requests
    assert experiment["display_name"] == "embedpipe-ci"
    assert run["display_name"] == "nightly"
    assert run["pipeline_spec"]["pipeline_spec"] == spec
    assert run["pipeline_spec"]["platform_spec"] == platform
    assert run["runtime_config"]["parameters"] == {
        "sources": ["s3://raw/flowers", "s3://raw/birds.tar"],
        "dedup": {"max_distance": 4},
    }
    assert run["run_id"] in result.stdout


def test_embedpipe_submit_makes_the_same_request(compiled, capsys):
    spec, platform = yaml.safe_load_all((compiled / "mine.yaml").read_text())
    with FakeKfpApi() as api:
        code = main(
            [
                *("submit", "mine", "--host", api.url, "--build-dir", str(compiled)),
                *("-e", "embedpipe-ci", "-r", "mine-1", "--service-account", "embedpipe-runner"),
                *("--param", "images_uri=s3://b/images", "--param", "metadata_uri=s3://b/kept"),
                *("--param", "embeddings_uri=s3://b/emb", "--set", "mine.top_k=7"),
                *("--param", 'combine={"num_samples": 5}', "--set", "mine.index=hnsw"),
            ]
        )
        assert code == 0
        run, _ = submitted_run(api)
    assert run["pipeline_spec"] == {"pipeline_spec": spec, "platform_spec": platform}
    assert run["service_account"] == "embedpipe-runner"
    assert run["runtime_config"]["parameters"] == {
        "images_uri": "s3://b/images",
        "metadata_uri": "s3://b/kept",
        "embeddings_uri": "s3://b/emb",
        "mine": {"top_k": 7, "index": "hnsw"},
        "combine": {"num_samples": 5},
    }
    assert f"run {run['run_id']}" in capsys.readouterr().out


def test_submit_rejects_unknown_and_missing_parameters_before_calling_the_api(compiled, capsys):
    package = compiled / "mine.yaml"
    with pytest.raises(ConfigError, match=r"--param topk: mine.yaml has no such parameter"):
        submit.parse_params(["topk=3"], package)
    with pytest.raises(ConfigError, match="needs --param for: embeddings_uri, metadata_uri"):
        submit.parse_params(["images_uri=s3://b/i"], package)
    given = ["images_uri=s3://b/i", "metadata_uri=m", "embeddings_uri=e"]
    edges = submit.parse_params(given, package, ["mine.band_quantiles=[0.25, 0.5]"])
    assert edges["mine"] == {"band_quantiles": [0.25, 0.5]}  # JSON, as kfp parses
    with pytest.raises(ConfigError, match=r"\[mine\]: .*one more name than band_quantiles"):
        submit.parse_params(given, package, ["mine.band_quantiles=[0.5]"])
    with pytest.raises(ConfigError, match=r"\[mine\]\.topk: unknown key"):
        submit.parse_params(given, package, ["mine.topk=3"])
    with pytest.raises(ConfigError, match=r"\[mine\]\.parallelism: set when the pipeline is"):
        submit.parse_params(given, package, ["mine.parallelism=2"])
    with pytest.raises(ConfigError, match=r"--set dedup\.max_distance: mine.yaml has no dedup"):
        submit.parse_params(given, package, ["dedup.max_distance=2"])
    with pytest.raises(ConfigError, match=r"\[combine\]\.num_samples: Input should be"):
        submit.parse_params([*given, 'combine={"num_samples": -1}'], package)
    code = main(["submit", "mine", "--host", "http://127.0.0.1:9", "--build-dir", str(compiled)])
    assert code == 2
    assert "needs --param for" in capsys.readouterr().err


@needs_kubectl
def test_deploy_without_credentials_previews_with_placeholders_but_never_applies(
    tmp_path, capsys, monkeypatch
):
    for key in CREDENTIALS:
        monkeypatch.delenv(key, raising=False)
    monkeypatch.delenv("KFP_HOST", raising=False)
    config = tmp_path / "cluster.toml"
    config.write_text(f'[global]\nbuild_dir = "{tmp_path / "build"}"\n')
    manifests = tmp_path / "manifests"
    shutil.copytree(MANIFESTS, manifests, ignore=shutil.ignore_patterns("object-store.env"))
    argv = ["deploy", "local", "--config", str(config), "--manifests", str(manifests)]
    assert main([*argv, "--dry-run"]) == 0
    assert "the dry run goes on with placeholder values" in capsys.readouterr().out
    assert main(argv) == 2
    assert "export AWS_ACCESS_KEY_ID and AWS_SECRET_ACCESS_KEY" in capsys.readouterr().err
    for key, value in CREDENTIALS.items():
        monkeypatch.setenv(key, value)
    assert main(argv) == 2  # no KFP endpoint: stops before kubectl apply
    assert "pass --host or set KFP_HOST" in capsys.readouterr().err
