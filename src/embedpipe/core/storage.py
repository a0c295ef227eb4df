"""One place that resolves every URI: a local path or ``s3://bucket/key``.

Reads and listings go through pyarrow's filesystem layer, uploads through
boto3's transfer manager; both take the endpoint from ``AWS_ENDPOINT_URL_S3``
or ``AWS_ENDPOINT_URL`` and credentials from the standard AWS chain, and both
retry with exponential backoff. Writes are atomic: data goes to a temporary
file first and is published in one step (``os.replace`` locally, a completed
upload on S3), so a reader never sees a partial file or object.
"""

from __future__ import annotations

import contextlib
import functools
import json
import os
import posixpath
import shutil
import tempfile
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any, BinaryIO
from urllib.parse import urlparse

import pyarrow.fs as pafs

S3_SCHEME = "s3://"
MAX_ATTEMPTS = 8
DEFAULT_REGION = "us-east-1"
TMP_SUFFIX = ".tmp"


class StorageError(RuntimeError):
    """A URI could not be read, listed or written."""


@dataclass(frozen=True)
class FileEntry:
    uri: str
    size: int


def is_s3(uri: str) -> bool:
    return uri.startswith(S3_SCHEME)


def split_s3(uri: str) -> tuple[str, str]:
    """``s3://bucket/a/b`` -> ``("bucket", "a/b")``."""
    rest = uri[len(S3_SCHEME) :]
    bucket, _, key = rest.partition("/")
    if not bucket:
        raise StorageError(f"{uri}: an s3 URI needs a bucket, as in s3://bucket/prefix")
    return bucket, key


def join(base: str, *parts: str) -> str:
    if is_s3(base):
        return posixpath.join(base.rstrip("/"), *parts)
    return os.path.join(base, *parts)


def normalize(uri: str) -> str:
    """Absolute local paths; S3 URIs without a trailing slash."""
    if is_s3(uri):
        return S3_SCHEME + uri[len(S3_SCHEME) :].rstrip("/")
    return os.path.abspath(os.path.expanduser(uri))


def endpoint_url() -> str | None:
    return os.environ.get("AWS_ENDPOINT_URL_S3") or os.environ.get("AWS_ENDPOINT_URL") or None


def _region() -> str:
    return os.environ.get("AWS_REGION") or os.environ.get("AWS_DEFAULT_REGION") or DEFAULT_REGION


@functools.lru_cache(maxsize=4)
def _s3_client(endpoint: str | None, region: str):
    import boto3
    from botocore.config import Config

    config = Config(retries={"max_attempts": MAX_ATTEMPTS, "mode": "standard"})
    return boto3.client("s3", endpoint_url=endpoint, region_name=region, config=config)


def s3_client():
    """A boto3 S3 client for the configured endpoint (cached per endpoint)."""
    return _s3_client(endpoint_url(), _region())


@functools.lru_cache(maxsize=4)
def _s3_filesystem(endpoint: str | None, region: str) -> pafs.S3FileSystem:
    options: dict[str, Any] = {
        "region": region,
        "retry_strategy": pafs.AwsStandardS3RetryStrategy(max_attempts=MAX_ATTEMPTS),
    }
    if endpoint:
        parsed = urlparse(endpoint)
        options["endpoint_override"] = parsed.netloc + parsed.path.rstrip("/")
        options["scheme"] = parsed.scheme or "https"
    return pafs.S3FileSystem(**options)


def arrow_filesystem(uri: str) -> tuple[pafs.FileSystem, str]:
    """The pyarrow filesystem that serves ``uri`` and the path within it."""
    if is_s3(uri):
        bucket, key = split_s3(uri)
        return _s3_filesystem(endpoint_url(), _region()), f"{bucket}/{key}".rstrip("/")
    return pafs.LocalFileSystem(), normalize(uri)


def file_type(uri: str) -> pafs.FileType:
    fs, path = arrow_filesystem(uri)
    try:
        info = fs.get_file_info(path)
    except OSError as error:
        raise StorageError(f"{uri}: {error}") from error
    if info.type == pafs.FileType.NotFound and is_s3(uri):
        # S3 has no directories: a prefix exists when some key starts with it.
        selector = pafs.FileSelector(path, recursive=False, allow_not_found=True)
        if fs.get_file_info(selector):
            return pafs.FileType.Directory
    return info.type


def exists(uri: str) -> bool:
    return file_type(uri) != pafs.FileType.NotFound


def iter_files(uri: str) -> Iterator[FileEntry]:
    """Every file under ``uri``, recursively, lazily, in a stable order.

    Local folders are walked one directory at a time (entries sorted); S3 is
    paged through ``list_objects_v2``, which returns keys in sorted order. No
    full listing is ever held in memory.
    """
    if is_s3(uri):
        bucket, key = split_s3(uri)
        prefix = key.rstrip("/") + "/" if key else ""
        pages = s3_client().get_paginator("list_objects_v2").paginate(Bucket=bucket, Prefix=prefix)
        try:
            for page in pages:
                for item in page.get("Contents", []):
                    if not item["Key"].endswith("/"):
                        yield FileEntry(f"{S3_SCHEME}{bucket}/{item['Key']}", item["Size"])
        except Exception as error:
            raise StorageError(f"{uri}: cannot list: {error}") from error
        return
    root = normalize(uri)
    if os.path.isdir(root):  # like an S3 prefix, a missing folder lists as empty
        yield from _walk_local(root)


def _walk_local(directory: str) -> Iterator[FileEntry]:
    try:
        with os.scandir(directory) as scan:
            entries = sorted(scan, key=lambda entry: entry.name)
    except OSError as error:
        raise StorageError(f"{directory}: cannot list: {error}") from error
    for entry in entries:
        if entry.is_dir():
            yield from _walk_local(entry.path)
        elif entry.is_file():
            yield FileEntry(entry.path, entry.stat().st_size)


def list_files(uri: str) -> list[FileEntry]:
    """Every file under ``uri`` (a small folder), sorted by URI."""
    return sorted(iter_files(uri), key=lambda entry: entry.uri)


def open_input(uri: str) -> BinaryIO:
    """A sequential binary stream; it never loads the whole object into memory."""
    fs, path = arrow_filesystem(uri)
    try:
        return fs.open_input_stream(path)
    except (OSError, FileNotFoundError) as error:
        raise StorageError(f"{uri}: cannot open: {error}") from error


def read_bytes(uri: str) -> bytes:
    """A whole file or object. S3 reads go through boto3: pyarrow does not retry a
    throttled GET of a small object (the error body overflows the read buffer)."""
    if not is_s3(uri):
        try:
            with open(normalize(uri), "rb") as handle:
                return handle.read()
        except OSError as error:
            raise StorageError(f"{uri}: cannot read: {error}") from error
    bucket, key = split_s3(uri)
    try:
        return s3_client().get_object(Bucket=bucket, Key=key)["Body"].read()
    except Exception as error:
        raise StorageError(f"{uri}: cannot read: {error}") from error


def read_json(uri: str) -> Any:
    try:
        return json.loads(read_bytes(uri))
    except json.JSONDecodeError as error:
        raise StorageError(f"{uri}: not valid JSON: {error}") from error


@contextlib.contextmanager
def atomic_output(uri: str) -> Iterator[str]:
    """Yield a local path to write; publish it at ``uri`` only if the block succeeds.

    The temporary file ends in ``.tmp``, never in the final extension: a reader that
    globs a dataset folder for ``*.parquet`` must not pick up a half-written shard.
    """
    if is_s3(uri):
        bucket, key = split_s3(uri)
        handle, tmp_path = tempfile.mkstemp(prefix=".embedpipe-", suffix=TMP_SUFFIX)
        os.close(handle)
        try:
            yield tmp_path
            # upload_file aborts its multipart upload on failure: no partial object appears.
            s3_client().upload_file(tmp_path, bucket, key)
        finally:
            with contextlib.suppress(FileNotFoundError):
                os.remove(tmp_path)
        return
    final_path = normalize(uri)
    directory = os.path.dirname(final_path)
    os.makedirs(directory, exist_ok=True)
    handle, tmp_path = tempfile.mkstemp(
        prefix=f".{os.path.basename(final_path)}.", suffix=TMP_SUFFIX, dir=directory
    )
    os.close(handle)
    try:
        yield tmp_path
        with open(tmp_path, "rb") as written:
            os.fsync(written.fileno())
        os.chmod(tmp_path, 0o644)
        os.replace(tmp_path, final_path)
    finally:
        with contextlib.suppress(FileNotFoundError):
            os.remove(tmp_path)


def write_bytes(uri: str, data: bytes) -> None:
    with atomic_output(uri) as path, open(path, "wb") as handle:
        handle.write(data)


def write_json(uri: str, obj: Any) -> None:
    """Stable JSON: sorted keys, two-space indent, trailing newline."""
    text = json.dumps(obj, indent=2, sort_keys=True, ensure_ascii=False) + "\n"
    write_bytes(uri, text.encode("utf-8"))


def delete(uri: str) -> None:
    fs, path = arrow_filesystem(uri)
    with contextlib.suppress(FileNotFoundError):
        fs.delete_file(path)


def copy_file(source: str, target: str) -> str:
    """Put a copy of ``source`` at ``target`` without moving its bytes through this
    process where the store allows: a hard link on one local filesystem, a server-side
    copy within S3; otherwise a plain copy. Returns how: "link", "server-side" or "copy"."""
    if is_s3(source) and is_s3(target):
        (source_bucket, source_key), (bucket, key) = split_s3(source), split_s3(target)
        try:  # managed copy: multipart and server-side, also past 5 GB
            s3_client().copy({"Bucket": source_bucket, "Key": source_key}, bucket, key)
        except Exception as error:
            raise StorageError(f"{target}: cannot copy from {source}: {error}") from error
        return "server-side"
    if not is_s3(source) and not is_s3(target):
        source_path, target_path = normalize(source), normalize(target)
        os.makedirs(os.path.dirname(target_path), exist_ok=True)
        with contextlib.suppress(FileNotFoundError):
            os.remove(target_path)
        try:
            os.link(source_path, target_path)
            return "link"
        except OSError:  # another filesystem, or links not allowed: copy below
            pass
    with open_input(source) as reader, atomic_output(target) as path, open(path, "wb") as out:
        shutil.copyfileobj(reader, out, 1 << 20)
    return "copy"
