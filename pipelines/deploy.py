"""`make deploy`: render a Kustomize overlay, apply it, upload the compiled pipelines.

Credentials are written only into a private temporary copy of manifests/ for the
time `kubectl kustomize` reads them; what is printed (DRY_RUN) shows the Secret
with its values redacted.
"""

from __future__ import annotations

import base64
import logging
import os
import shutil
import subprocess
import tempfile
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path

import yaml
from kfp_server_api.exceptions import ApiException

from embedpipe.config import ConfigError
from embedpipe.pipelines.cluster import OBJECT_STORE_SECRET_KEYS
from embedpipe.pipelines.compile import read_pipeline_spec

log = logging.getLogger(__name__)

CREDENTIALS_FILE = Path("base") / "object-store.env"
EXAMPLE_CREDENTIALS_FILE = Path("base") / "object-store.env.example"
SETTINGS_FILE = "settings.env"
CLUSTER_FILE = "cluster.toml"
REDACTED = base64.b64encode(b"<redacted>").decode()


def overlay_dir(manifests: str | Path, env: str) -> Path:
    overlays = Path(manifests) / "overlays"
    path = overlays / env
    if not (path / "kustomization.yaml").is_file():
        known = (
            sorted(p.name for p in overlays.iterdir() if p.is_dir()) if overlays.is_dir() else []
        )
        raise ConfigError(f"{path}: no such overlay (known: {', '.join(known) or 'none'})")
    return path


def read_env_file(path: str | Path) -> dict[str, str]:
    """KEY=VALUE lines as Kustomize's `envs` reads them; comments and blank lines skipped."""
    values = {}
    for number, raw in enumerate(Path(path).read_text(encoding="utf-8").splitlines(), 1):
        line = raw.strip()
        if not line or line.startswith("#"):
            continue
        key, sep, value = line.partition("=")
        if not sep or not key.strip():
            raise ConfigError(f"{path}:{number}: expected KEY=VALUE")
        values[key.strip()] = value.strip()
    return values


def _credentials_from(path: Path) -> dict[str, str]:
    values = read_env_file(path)
    missing = [key for key in OBJECT_STORE_SECRET_KEYS if not values.get(key)]
    if missing:
        raise ConfigError(f"{path}: missing {', '.join(missing)}")
    return {key: values[key] for key in OBJECT_STORE_SECRET_KEYS}


def example_credentials(manifests: str | Path) -> dict[str, str]:
    """The placeholders of object-store.env.example, for rendering without real credentials."""
    return _credentials_from(Path(manifests) / EXAMPLE_CREDENTIALS_FILE)


def object_store_credentials(
    manifests: str | Path, credentials_file: str | None, environ: Mapping[str, str]
) -> dict[str, str]:
    """From CREDENTIALS=FILE, else manifests/base/object-store.env, else the environment."""
    if credentials_file:
        if not Path(credentials_file).is_file():
            raise ConfigError(f"{credentials_file}: credentials file not found")
        return _credentials_from(Path(credentials_file))
    if (Path(manifests) / CREDENTIALS_FILE).is_file():
        return _credentials_from(Path(manifests) / CREDENTIALS_FILE)
    missing = [key for key in OBJECT_STORE_SECRET_KEYS if not environ.get(key)]
    if missing:
        raise ConfigError(
            "no object-store credentials: export "
            + " and ".join(OBJECT_STORE_SECRET_KEYS)
            + f", or write {Path(manifests) / CREDENTIALS_FILE} (see its .example), "
            "or pass CREDENTIALS=FILE"
        )
    return {key: environ[key] for key in OBJECT_STORE_SECRET_KEYS}


def render(manifests: str | Path, env: str, credentials: Mapping[str, str]) -> str:
    """`kubectl kustomize` of the overlay, with the credentials Secret generated."""
    overlay = overlay_dir(manifests, env)
    for key, value in credentials.items():
        if "\n" in value or "\r" in value:  # would smuggle extra keys into the env file
            raise ConfigError(f"{key}: a credential value cannot contain a line break")
    with tempfile.TemporaryDirectory(prefix="embedpipe-manifests-") as tmp:
        copy = Path(tmp) / "manifests"
        shutil.copytree(manifests, copy, ignore=shutil.ignore_patterns(CREDENTIALS_FILE.name))
        secret_file = copy / CREDENTIALS_FILE
        descriptor = os.open(secret_file, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        with os.fdopen(descriptor, "w", encoding="utf-8") as handle:
            handle.writelines(f"{key}={value}\n" for key, value in credentials.items())
        target = copy / overlay.relative_to(manifests)
        try:
            result = subprocess.run(
                ["kubectl", "kustomize", str(target)], capture_output=True, text=True, check=False
            )
        except FileNotFoundError:
            raise ConfigError(
                "kubectl not found: install kubectl (it includes kustomize)"
            ) from None
    if result.returncode != 0:
        message = result.stderr.strip().replace(str(copy), str(manifests))
        raise ConfigError(f"kubectl kustomize {overlay} failed: {message}")
    return result.stdout


def redact(rendered: str) -> str:
    """The same manifests with every Secret value replaced, safe to print or keep."""
    documents = [doc for doc in yaml.safe_load_all(rendered) if doc]
    for document in documents:
        if document.get("kind") == "Secret":
            for field in ("data", "stringData"):
                if field in document:
                    document[field] = dict.fromkeys(document[field], REDACTED)
    return yaml.safe_dump_all(documents, sort_keys=False)


def apply(rendered: str) -> None:
    result = subprocess.run(
        ["kubectl", "apply", "-f", "-"], input=rendered, capture_output=True, text=True, check=False
    )
    if result.returncode != 0:
        raise RuntimeError(f"kubectl apply failed: {result.stderr.strip()}")
    log.info("applied:\n%s", result.stdout.strip())


def git_revision(cwd: str | Path = ".") -> str:
    """Short commit id, marked -dirty when the tree has uncommitted changes."""

    def git(*args: str) -> str:
        return subprocess.run(
            ["git", *args], cwd=cwd, capture_output=True, text=True, check=True
        ).stdout.strip()

    try:
        revision = git("rev-parse", "--short=12", "HEAD")
        return revision + ("-dirty" if git("status", "--porcelain") else "")
    except (subprocess.CalledProcessError, FileNotFoundError):
        raise ConfigError(
            "pipeline versions are named by git revision: run inside a git checkout"
        ) from None


def pipeline_name(package: str | Path) -> str:
    return read_pipeline_spec(package)["pipelineInfo"]["name"]


@dataclass(frozen=True)
class Upload:
    package: str
    pipeline: str
    version: str
    pipeline_id: str = ""
    version_id: str = ""


def upload_pipelines(
    client_factory: Callable[[], object], packages: Iterable[str | Path], version: str
) -> list[Upload]:
    """Each package as version ``version`` of the pipeline its YAML names (created if new)."""
    client = client_factory()
    uploads = []
    for package in packages:
        name = pipeline_name(package)
        pipeline_id = client.get_pipeline_id(name)
        if pipeline_id is None:
            created = client.upload_pipeline(
                str(package), pipeline_name=name, description=f"embedpipe {name}"
            )
            pipeline_id = created.pipeline_id
            log.info("created pipeline %s (%s)", name, pipeline_id)
        try:
            uploaded = client.upload_pipeline_version(
                str(package), pipeline_version_name=version, pipeline_id=pipeline_id
            )
        except ApiException as error:
            hint = (
                " (already uploaded: commit, or delete that version)" if error.status == 409 else ""
            )
            raise RuntimeError(
                f"{package}: uploading {name} version {version} failed: "
                f"HTTP {error.status} {error.reason}{hint}"
            ) from None
        uploads.append(
            Upload(str(package), name, version, pipeline_id, uploaded.pipeline_version_id)
        )
        log.info("uploaded %s as %s version %s", package, name, version)
    return uploads
