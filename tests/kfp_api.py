"""A loopback HTTP server answering the KFP v2beta1 REST endpoints that `kfp run submit`,
`kfp.Client.create_run_from_pipeline_package` and pipeline uploads use.

It keeps what it is sent (experiments, runs, pipelines, versions) so tests can check the
requests the real kfp client made: their paths, bodies and uploaded files.
"""

from __future__ import annotations

import email.parser
import email.policy
import json
import threading
import uuid
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from urllib.parse import parse_qs, urlparse

PREFIX = "/apis/v2beta1"
TIMESTAMP = "2026-11-22T00:00:00Z"


@dataclass
class KfpState:
    requests: list[tuple[str, str]] = field(default_factory=list)
    experiments: dict[str, dict] = field(default_factory=dict)
    runs: dict[str, dict] = field(default_factory=dict)
    pipelines: dict[str, dict] = field(default_factory=dict)
    versions: dict[str, dict] = field(default_factory=dict)
    uploads: list[dict] = field(default_factory=list)


def _name_filter(query: dict) -> str | None:
    raw = query.get("filter", [""])[0]
    if not raw:
        return None
    predicates = json.loads(raw).get("predicates", [])
    for predicate in predicates:
        if predicate.get("key") in ("display_name", "name"):
            return predicate.get("string_value", predicate.get("stringValue"))
    return None


def _multipart_file(content_type: str, body: bytes) -> tuple[str, bytes]:
    message = email.parser.BytesParser(policy=email.policy.HTTP).parsebytes(
        f"Content-Type: {content_type}\r\n\r\n".encode() + body
    )
    for part in message.iter_parts():
        if part.get_param("name", header="content-disposition") == "uploadfile":
            return part.get_filename(), part.get_payload(decode=True)
    raise ValueError("no uploadfile part")


class _Handler(BaseHTTPRequestHandler):
    state: KfpState

    def log_message(self, *args):  # keep pytest output clean
        pass

    def _reply(self, status: int, payload: dict) -> None:
        body = json.dumps(payload).encode()
        self.send_response(status)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def _body(self) -> bytes:
        return self.rfile.read(int(self.headers.get("Content-Length", 0)))

    def do_GET(self):
        url = urlparse(self.path)
        query = parse_qs(url.query)
        self.state.requests.append(("GET", url.path))
        path = url.path.removeprefix(PREFIX)
        if path == "/healthz":
            return self._reply(200, {"multi_user": False})
        if path == "/experiments":
            name = _name_filter(query)
            found = [
                e for e in self.state.experiments.values() if name in (None, e["display_name"])
            ]
            return self._reply(200, {"experiments": found, "total_size": len(found)})
        if path.startswith("/runs/"):
            run = self.state.runs.get(path.rsplit("/", 1)[1])
            return self._reply(200, run) if run else self._reply(404, {"error": "no such run"})
        if path == "/pipelines":
            name = _name_filter(query)
            found = [p for p in self.state.pipelines.values() if name in (None, p["display_name"])]
            return self._reply(200, {"pipelines": found, "total_size": len(found)})
        return self._reply(404, {"error": f"not answered here: GET {url.path}"})

    def do_POST(self):
        url = urlparse(self.path)
        query = parse_qs(url.query)
        self.state.requests.append(("POST", url.path))
        path = url.path.removeprefix(PREFIX)
        body = self._body()
        if path == "/experiments":
            experiment = json.loads(body)
            experiment |= {"experiment_id": str(uuid.uuid4()), "created_at": TIMESTAMP}
            self.state.experiments[experiment["experiment_id"]] = experiment
            return self._reply(200, experiment)
        if path == "/runs":
            run = json.loads(body)
            run |= {"run_id": str(uuid.uuid4()), "state": "PENDING", "created_at": TIMESTAMP}
            self.state.runs[run["run_id"]] = run
            return self._reply(200, run)
        if path in ("/pipelines/upload", "/pipelines/upload_version"):
            filename, content = _multipart_file(self.headers["Content-Type"], body)
            upload = {"path": path, "query": query, "filename": filename, "content": content}
            self.state.uploads.append(upload)
            if path == "/pipelines/upload":
                pipeline = {
                    "pipeline_id": str(uuid.uuid4()),
                    "display_name": query["name"][0],
                    "created_at": TIMESTAMP,
                }
                self.state.pipelines[pipeline["pipeline_id"]] = pipeline
                return self._reply(200, pipeline)
            pipeline_id = query["pipelineid"][0]
            if pipeline_id not in self.state.pipelines:
                return self._reply(404, {"error": "no such pipeline"})
            if any(
                v["pipeline_id"] == pipeline_id and v["display_name"] == query["name"][0]
                for v in self.state.versions.values()
            ):
                return self._reply(409, {"error": "version name already exists"})
            version = {
                "pipeline_id": pipeline_id,
                "pipeline_version_id": str(uuid.uuid4()),
                "display_name": query["name"][0],
                "created_at": TIMESTAMP,
            }
            self.state.versions[version["pipeline_version_id"]] = version
            return self._reply(200, version)
        return self._reply(404, {"error": f"not answered here: POST {url.path}"})


class FakeKfpApi:
    """Context manager: ``with FakeKfpApi() as api: api.url, api.state``."""

    def __init__(self):
        self.state = KfpState()
        handler = type("Handler", (_Handler,), {"state": self.state})
        self._server = ThreadingHTTPServer(("127.0.0.1", 0), handler)
        self.url = f"http://127.0.0.1:{self._server.server_address[1]}"
        self._thread = threading.Thread(target=self._server.serve_forever, daemon=True)

    def __enter__(self) -> FakeKfpApi:
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._server.shutdown()
        self._server.server_close()
