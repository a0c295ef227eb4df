"""The Kubernetes API calls of a launcher: create an object under a deterministic name (or
re-attach to the one a previous attempt created), read it, list, delete, and wait.

Transient failures (connection errors, 429, 5xx) are retried here with backoff; anything
else is an error naming the call, the status and the API server's message.
"""

from __future__ import annotations

import json
import logging
import os
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from embedpipe.kube.objects import SPEC_HASH, spec_hash

log = logging.getLogger(__name__)

NAMESPACE_FILE = "/var/run/secrets/kubernetes.io/serviceaccount/namespace"
TRANSIENT_STATUS = frozenset({429, 500, 502, 503, 504})
ATTEMPTS = 5


def now() -> float:
    return time.monotonic()


class KubeError(RuntimeError):
    """The API server refused a call, or an object ended in failure."""


@dataclass(frozen=True)
class Resource:
    group: str
    version: str
    plural: str
    kind: str


EXPERIMENT = Resource("kubeflow.org", "v1beta1", "experiments", "Experiment")
TRIAL = Resource("kubeflow.org", "v1beta1", "trials", "Trial")
TRAINJOB = Resource("trainer.kubeflow.org", "v1alpha1", "trainjobs", "TrainJob")


def connect():
    """An API client: the pod's service account in a cluster, else the kubeconfig
    (``KUBECONFIG`` or ``~/.kube/config``)."""
    from kubernetes import client, config

    try:
        config.load_incluster_config()
    except config.ConfigException:
        try:
            config.load_kube_config(config_file=os.environ.get("KUBECONFIG"))
        except (config.ConfigException, FileNotFoundError, TypeError) as error:
            raise KubeError(
                f"no Kubernetes API: not in a pod and no usable kubeconfig ({error})"
            ) from None
    return client.ApiClient()


def current_namespace() -> str:
    """The pod's namespace, else the kubeconfig context's, else ``default``."""
    if os.path.exists(NAMESPACE_FILE):
        with open(NAMESPACE_FILE, encoding="utf-8") as handle:
            return handle.read().strip()
    try:
        from kubernetes import config

        _, context = config.list_kube_config_contexts(config_file=os.environ.get("KUBECONFIG"))
        return context.get("context", {}).get("namespace") or "default"
    except Exception:  # no kubeconfig: the default namespace, as kubectl would
        return "default"


def _message(error) -> str:
    try:
        return json.loads(error.body).get("message", "") or error.reason
    except (TypeError, ValueError, AttributeError):
        return str(getattr(error, "reason", "") or error)


class Objects:
    """One kind of object in one namespace."""

    def __init__(self, api_client, resource: Resource, namespace: str):
        from kubernetes import client

        self.api = client.CustomObjectsApi(api_client)
        self.resource, self.namespace = resource, namespace

    def _call(self, what: str, function: Callable, **kwargs) -> Any:
        from kubernetes.client.exceptions import ApiException
        from urllib3.exceptions import HTTPError

        r = self.resource
        for attempt in range(ATTEMPTS):
            try:
                return function(
                    group=r.group, version=r.version, namespace=self.namespace, plural=r.plural,
                    **kwargs,
                )  # fmt: skip
            except ApiException as error:
                if error.status == 409 and what == "create":
                    raise _AlreadyExists from None
                if error.status not in TRANSIENT_STATUS or attempt == ATTEMPTS - 1:
                    raise KubeError(
                        f"{what} {r.kind} in namespace {self.namespace}: "
                        f"{error.status} {error.reason}: {_message(error)}"
                    ) from None
                why = f"{error.status} {error.reason}"
            except HTTPError as error:
                if attempt == ATTEMPTS - 1:
                    raise KubeError(f"{what} {r.kind}: API server unreachable: {error}") from None
                why = str(error)
            wait = min(30.0, 2.0**attempt)
            log.warning("%s %s: %s; retrying in %.0f s", what, r.kind, why, wait)
            time.sleep(wait)
        raise AssertionError("unreachable")

    def create_or_attach(self, body: dict[str, Any]) -> tuple[dict[str, Any], bool]:
        """Create ``body``; where an object of that name exists (a retried pod), follow it
        instead, if it was made from the same spec. Returns the object and whether it was
        already there."""
        name = body["metadata"]["name"]
        wanted = spec_hash(body)
        body["metadata"].setdefault("annotations", {})[SPEC_HASH] = wanted
        try:
            return self._call("create", self.api.create_namespaced_custom_object, body=body), False
        except _AlreadyExists:
            existing = self.get(name)
            found = (existing.get("metadata", {}).get("annotations") or {}).get(SPEC_HASH)
            if found != wanted:
                raise KubeError(
                    f"{self.resource.kind} {name} exists in namespace {self.namespace} with "
                    "another spec; delete it to start again"
                ) from None
            log.info("%s %s exists: re-attaching to it", self.resource.kind, name)
            return existing, True

    def get(self, name: str) -> dict[str, Any]:
        return self._call("get", self.api.get_namespaced_custom_object, name=name)

    def list(self, label_selector: str) -> list[dict[str, Any]]:
        found = self._call(
            "list", self.api.list_namespaced_custom_object, label_selector=label_selector
        )
        return found.get("items", [])

    def delete(self, name: str) -> None:
        self._call("delete", self.api.delete_namespaced_custom_object, name=name)


class _AlreadyExists(Exception):
    pass


def condition(obj: dict[str, Any], kind: str) -> dict[str, Any] | None:
    """The status condition of type ``kind`` that is True, if any."""
    for found in (obj.get("status") or {}).get("conditions") or []:
        if found.get("type") == kind and str(found.get("status")) == "True":
            return found
    return None


def wait_for(
    objects: Objects,
    name: str,
    outcome: Callable[[dict[str, Any]], bool | None],
    *,
    timeout_s: float,
    poll_s: float,
    progress: Callable[[dict[str, Any]], None] = lambda obj: None,
) -> dict[str, Any]:
    """Poll until ``outcome(obj)`` says True (done) or raises (failed); a TimeoutError
    after ``timeout_s``."""
    deadline = now() + timeout_s
    while True:
        obj = objects.get(name)
        progress(obj)
        if outcome(obj):
            return obj
        if now() >= deadline:
            raise TimeoutError(
                f"{objects.resource.kind} {name} did not finish within {timeout_s / 60:.0f} min"
            )
        time.sleep(poll_s)


class _TrainJobProgress:
    """Logs the TrainJob's condition and its jobs' pod counts when they change."""

    def __init__(self, name: str):
        self.name, self.last = name, None

    def __call__(self, job: dict[str, Any]) -> None:
        status = job.get("status") or {}
        conditions = [f"{c.get('type')}={c.get('status')}" for c in status.get("conditions") or []]
        jobs = [
            f"{j.get('name')}: {j.get('active', 0)} active, {j.get('ready', 0)} ready, "
            f"{j.get('succeeded', 0)} succeeded, {j.get('failed', 0)} failed"
            for j in status.get("jobsStatus") or []
        ]
        now = (tuple(conditions), tuple(jobs))
        if now != self.last:
            self.last = now
            log.info("TrainJob %s: %s %s", self.name, " ".join(conditions) or "pending", jobs)


def _train_job_finished(job: dict[str, Any]) -> bool:
    failed = condition(job, "Failed")
    if failed:
        raise KubeError(
            f"TrainJob {job['metadata']['name']} failed: {failed.get('reason', '')}: "
            f"{failed.get('message', '')}"
        )
    return condition(job, "Complete") is not None


def run_train_job(
    api_client, body: dict[str, Any], namespace: str, timeout_s: float, poll_s: float
) -> dict[str, Any]:
    """Create the TrainJob (or re-attach to it) and follow it until it completes; a
    KubeError with the job's own reason when it fails, or after ``timeout_s`` (the job is
    deleted then, freeing its GPUs)."""
    name = body["metadata"]["name"]
    body["metadata"].pop("namespace", None)
    jobs = Objects(api_client, TRAINJOB, namespace)
    _, attached = jobs.create_or_attach(body)
    log.info("%s TrainJob %s in %s", "following" if attached else "created", name, namespace)
    try:
        return wait_for(
            jobs, name, _train_job_finished, timeout_s=timeout_s, poll_s=poll_s,
            progress=_TrainJobProgress(name),
        )  # fmt: skip
    except TimeoutError as error:
        jobs.delete(name)
        raise KubeError(f"{error}; deleted it") from None
