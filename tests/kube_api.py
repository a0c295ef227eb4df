"""A loopback HTTP server answering the Kubernetes API calls embedpipe's launchers make
(create, get, list and delete of custom objects), and a kubeconfig that points at it.

Objects live in ``state.objects``; ``state.statuses[(plural, name)]`` holds the statuses
successive GETs return (the last repeats), so a test scripts how an Experiment or a
TrainJob moves to Succeeded or Failed. ``state.on_status`` runs when a status is served
(e.g. to write what a finished job would have written).
"""

from __future__ import annotations

import json
import re
import threading
from collections.abc import Callable
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from urllib.parse import parse_qs, urlparse

import yaml

PATH = re.compile(
    r"^/apis/(?P<group>[^/]+)/(?P<version>[^/]+)/namespaces/(?P<namespace>[^/]+)/"
    r"(?P<plural>[^/]+)(?:/(?P<name>[^/]+))?$"
)


@dataclass
class KubeState:
    requests: list[tuple[str, str]] = field(default_factory=list)
    objects: dict[tuple[str, str], dict] = field(default_factory=dict)  # (plural, name)
    statuses: dict[tuple[str, str], list[dict]] = field(default_factory=dict)
    created: list[dict] = field(default_factory=list)
    deleted: list[tuple[str, str]] = field(default_factory=list)
    on_status: Callable[[str, str, dict], None] | None = None


class _Handler(BaseHTTPRequestHandler):
    state: KubeState

    def log_message(self, *args):
        pass

    def _reply(self, status: int, payload: dict) -> None:
        body = json.dumps(payload).encode()
        self.send_response(status)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def _error(self, status: int, reason: str, message: str) -> None:
        self._reply(
            status,
            {"kind": "Status", "status": "Failure", "reason": reason, "message": message,
             "code": status},
        )  # fmt: skip

    def _route(self, method: str):
        url = urlparse(self.path)
        self.state.requests.append((method, self.path))
        match = PATH.match(url.path)
        if not match:
            self._error(404, "NotFound", f"no route {url.path}")
            return None
        return match, parse_qs(url.query)

    def do_POST(self):
        routed = self._route("POST")
        if routed is None:
            return
        match, _ = routed
        body = json.loads(self.rfile.read(int(self.headers.get("Content-Length", 0))))
        key = (match["plural"], body["metadata"]["name"])
        if key in self.state.objects:
            return self._error(409, "AlreadyExists", f'{key[0]} "{key[1]}" already exists')
        body["metadata"]["namespace"] = match["namespace"]
        self.state.objects[key] = body
        self.state.created.append(body)
        self._reply(201, body)

    def do_GET(self):
        routed = self._route("GET")
        if routed is None:
            return
        match, query = routed
        plural, name = match["plural"], match["name"]
        if name is None:
            selector = query.get("labelSelector", [""])[0]
            wanted = dict(part.split("=", 1) for part in selector.split(",") if part)
            items = [
                obj
                for (kind, _), obj in self.state.objects.items()
                if kind == plural
                and all(
                    (obj["metadata"].get("labels") or {}).get(k) == v for k, v in wanted.items()
                )
            ]
            return self._reply(200, {"kind": "List", "items": items})
        key = (plural, name)
        if key not in self.state.objects:
            return self._error(404, "NotFound", f'{plural} "{name}" not found')
        obj = self.state.objects[key]
        script = self.state.statuses.get(key)
        if script:
            obj["status"] = script.pop(0) if len(script) > 1 else script[0]
            if self.state.on_status:
                self.state.on_status(plural, name, obj["status"])
        self._reply(200, obj)

    def do_DELETE(self):
        routed = self._route("DELETE")
        if routed is None:
            return
        match, _ = routed
        key = (match["plural"], match["name"])
        if self.state.objects.pop(key, None) is None:
            return self._error(404, "NotFound", f"{key} not found")
        self.state.deleted.append(key)
        self._reply(200, {"kind": "Status", "status": "Success"})


class KubeServer:
    """``with KubeServer(tmp_path) as server:`` sets KUBECONFIG to a file naming it."""

    def __init__(self, folder, monkeypatch, namespace: str = "team-a"):
        handler = type("Handler", (_Handler,), {"state": KubeState()})
        self.state = handler.state
        self.httpd = ThreadingHTTPServer(("127.0.0.1", 0), handler)
        self.url = f"http://127.0.0.1:{self.httpd.server_address[1]}"
        self.namespace = namespace
        kubeconfig = folder / "kubeconfig"
        kubeconfig.write_text(
            yaml.safe_dump(
                {
                    "apiVersion": "v1",
                    "kind": "Config",
                    "clusters": [{"name": "loop", "cluster": {"server": self.url}}],
                    "users": [{"name": "me", "user": {"token": "t0ken"}}],
                    "contexts": [
                        {
                            "name": "loop",
                            "context": {"cluster": "loop", "user": "me", "namespace": namespace},
                        }
                    ],
                    "current-context": "loop",
                }
            )
        )
        monkeypatch.setenv("KUBECONFIG", str(kubeconfig))

    def __enter__(self) -> KubeServer:
        threading.Thread(target=self.httpd.serve_forever, daemon=True).start()
        return self

    def __exit__(self, *exc) -> None:
        self.httpd.shutdown()
        self.httpd.server_close()
