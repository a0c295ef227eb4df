import http.server
import os
import re
import threading
from typing import ClassVar

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from embedpipe.core import storage


def test_local_atomic_write_publishes_whole_file(tmp_path):
    target = tmp_path / "nested" / "data.bin"
    storage.write_bytes(str(target), b"payload")
    assert target.read_bytes() == b"payload"
    assert os.listdir(target.parent) == ["data.bin"]


def test_local_failed_write_keeps_previous_content_and_leaves_no_temp_file(tmp_path):
    target = tmp_path / "data.json"
    storage.write_json(str(target), {"version": 1})
    with pytest.raises(RuntimeError), storage.atomic_output(str(target)) as path:
        with open(path, "w") as handle:
            handle.write('{"version": 2, "trunc')
        raise RuntimeError("writer died half way")
    assert storage.read_json(str(target)) == {"version": 1}
    assert os.listdir(tmp_path) == ["data.json"]


def test_temporary_files_are_never_parquet(tmp_path):
    """A reader globbing a dataset folder for *.parquet must not see a half-written shard."""
    with storage.atomic_output(str(tmp_path / "part-00000.parquet")) as path:
        assert os.path.dirname(path) == str(tmp_path)
        assert path.endswith(".tmp")
        pq.write_table(pa.table({"a": [1]}), path)
    assert os.listdir(tmp_path) == ["part-00000.parquet"]


def test_json_is_stable(tmp_path):
    storage.write_json(str(tmp_path / "a.json"), {"b": 1, "a": [2, 1]})
    assert (tmp_path / "a.json").read_text() == '{\n  "a": [\n    2,\n    1\n  ],\n  "b": 1\n}\n'


def test_s3_round_trip_through_boto3_and_pyarrow(bucket):
    uri = f"s3://{bucket}/dir/one.bin"
    storage.write_bytes(uri, b"\x00\x01payload")
    storage.write_bytes(f"s3://{bucket}/dir/sub/two.bin", b"two")
    storage.write_bytes(f"s3://{bucket}/other.bin", b"three")
    assert storage.read_bytes(uri) == b"\x00\x01payload"
    assert storage.exists(uri)
    assert storage.exists(f"s3://{bucket}/dir")  # a prefix counts as a folder
    assert not storage.exists(f"s3://{bucket}/missing.bin")
    listed = storage.list_files(f"s3://{bucket}/dir")
    assert [(e.uri, e.size) for e in listed] == [
        (f"s3://{bucket}/dir/one.bin", 9),
        (f"s3://{bucket}/dir/sub/two.bin", 3),
    ]
    storage.delete(uri)
    assert not storage.exists(uri)


def test_s3_failed_write_publishes_nothing(bucket):
    uri = f"s3://{bucket}/result.json"
    storage.write_json(uri, {"version": 1})
    with pytest.raises(RuntimeError), storage.atomic_output(uri) as path:
        with open(path, "w") as handle:
            handle.write("partial")
        raise RuntimeError("writer died")
    with pytest.raises(RuntimeError), storage.atomic_output(f"s3://{bucket}/new.json"):
        raise RuntimeError("writer died before writing")
    assert storage.read_json(uri) == {"version": 1}
    assert not storage.exists(f"s3://{bucket}/new.json")


def test_pyarrow_filesystem_reads_parquet_on_s3(bucket, tmp_path):
    import pyarrow as pa

    table = pa.table({"x": [1, 2, 3]})
    with storage.atomic_output(f"s3://{bucket}/t.parquet") as path:
        pq.write_table(table, path)
    fs, path = storage.arrow_filesystem(f"s3://{bucket}/t.parquet")
    assert pq.read_table(path, filesystem=fs).equals(table)


def test_endpoint_prefers_the_s3_specific_variable(monkeypatch):
    monkeypatch.setenv("AWS_ENDPOINT_URL", "http://general:9000")
    monkeypatch.delenv("AWS_ENDPOINT_URL_S3", raising=False)
    assert storage.endpoint_url() == "http://general:9000"
    monkeypatch.setenv("AWS_ENDPOINT_URL_S3", "http://minio:9000")
    assert storage.endpoint_url() == "http://minio:9000"
    fs, path = storage.arrow_filesystem("s3://bucket/key")
    assert path == "bucket/key"
    assert fs.type_name == "s3"


class FlakyS3(http.server.BaseHTTPRequestHandler):
    """Answers 503 SlowDown to the first two requests of each method, then serves one object."""

    protocol_version = "HTTP/1.1"
    failures: ClassVar[dict[str, int]] = {}
    stored: ClassVar[dict[str, bytes]] = {}

    def _flaky(self) -> bool:
        seen = self.failures.get(self.command, 0)
        self.failures[self.command] = seen + 1
        if seen < 2:
            body = b"<Error><Code>SlowDown</Code><Message>busy</Message></Error>"
            self.send_response(503)
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)
            return True
        return False

    def do_PUT(self):
        data = self.rfile.read(int(self.headers.get("Content-Length", 0)))
        if self._flaky():
            return
        self.stored[self.path] = data
        self.send_response(200)
        self.send_header("ETag", '"etag"')
        self.send_header("Content-Length", "0")
        self.end_headers()

    def _object(self, with_body: bool):
        if self._flaky():
            return
        data = self.stored.get(self.path, b"")
        status = 200
        requested = re.fullmatch(r"bytes=(\d+)-(\d*)", self.headers.get("Range", ""))
        if requested:
            first = int(requested.group(1))
            last = int(requested.group(2) or len(data) - 1)
            data, status = data[first : last + 1], 206
        self.send_response(status)
        self.send_header("Content-Length", str(len(data)))
        self.send_header("Last-Modified", "Sun, 22 Nov 2026 00:00:00 GMT")
        self.end_headers()
        if with_body:
            self.wfile.write(data)

    def do_GET(self):
        self._object(with_body=True)

    def do_HEAD(self):
        self._object(with_body=False)

    def log_message(self, *args):
        pass


def test_reads_and_writes_retry_transient_errors(monkeypatch):
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), FlakyS3)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        monkeypatch.setenv("AWS_ENDPOINT_URL_S3", f"http://127.0.0.1:{server.server_port}")
        monkeypatch.setenv("AWS_ACCESS_KEY_ID", "testing")
        monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "testing")
        storage.write_bytes("s3://flaky/key.bin", b"survived")
        assert FlakyS3.failures["PUT"] == 3
        assert storage.read_bytes("s3://flaky/key.bin") == b"survived"
    finally:
        server.shutdown()


def test_bad_s3_uri_names_the_problem():
    with pytest.raises(storage.StorageError, match="needs a bucket"):
        storage.split_s3("s3:///key")
