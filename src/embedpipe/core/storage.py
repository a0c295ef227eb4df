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
import socket
import tempfile
from collections.abc import Callable, Iterator
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


NO_CREDENTIALS = "no credentials (set AWS_ACCESS_KEY_ID/AWS_SECRET_ACCESS_KEY)"
ACCESS_DENIED_CODES = {"AccessDenied", "InvalidAccessKeyId", "SignatureDoesNotMatch", "403"}


def error_chain(error: BaseException) -> list[BaseException]:
    chain: list[BaseException] = []
    while error is not None and error not in chain:
        chain.append(error)
        error = error.__cause__ or error.__context__
    return chain


def _unreachable(why: str) -> str:
    where = endpoint_url() or "AWS S3 (set AWS_ENDPOINT_URL_S3 for MinIO, Ceph or another store)"
    return f"cannot reach the endpoint {where} ({why})"


def s3_error_reason(error: BaseException) -> str:
    """One line saying why an S3 call failed, from botocore's, boto3's or pyarrow's error."""
    from botocore import exceptions as boto

    chain = error_chain(error)
    for link in chain:
        if isinstance(link, boto.NoCredentialsError | boto.PartialCredentialsError):
            return NO_CREDENTIALS
        if isinstance(link, boto.ClientError):
            details = link.response.get("Error", {})
            code = str(details.get("Code", ""))
            if code == "NoSuchBucket":
                return "bucket does not exist"
            if code in ACCESS_DENIED_CODES:
                return f"access denied ({code}): check the credentials and the bucket policy"
            return f"{code}: {details.get('Message') or link}"
        if isinstance(link, boto.EndpointConnectionError | boto.ConnectionError):
            if any(isinstance(cause, ConnectionRefusedError) for cause in chain):
                return _unreachable("connection refused")
            if any(isinstance(cause, socket.gaierror) for cause in chain):
                return _unreachable("unknown host")
            if isinstance(link, boto.ConnectTimeoutError):
                return _unreachable("timed out")
            return _unreachable(str(link))
    message = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
    # pyarrow's S3 layer reports AWS SDK error names inside an OSError's text.
    if "NETWORK_CONNECTION" in message or "Couldn't connect" in message:
        return _unreachable("connection refused")
    if "NoSuchBucket" in message or "Bucket does not exist" in message:
        return "bucket does not exist"
    if "ACCESS_DENIED" in message or "AccessDenied" in message:
        return f"access denied: check the credentials and the bucket policy ({message})"
    return message


@contextlib.contextmanager
def s3_errors(uri: str, action: str = "") -> Iterator[None]:
    """Turn botocore/boto3/pyarrow errors about ``uri`` into one-line StorageErrors."""
    try:
        yield
    except StorageError:
        raise
    except Exception as error:
        from boto3.exceptions import Boto3Error
        from botocore.exceptions import BotoCoreError, ClientError

        if not isinstance(error, BotoCoreError | ClientError | Boto3Error | OSError):
            raise
        doing = f"cannot {action}: " if action else ""
        raise StorageError(f"{uri}: {doing}{s3_error_reason(error)}") from None


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
    # A session of its own: boto3's default session keeps the credentials it found first.
    session = boto3.session.Session()
    return session.client("s3", endpoint_url=endpoint, region_name=region, config=config)


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
    if not is_s3(uri):
        try:
            return fs.get_file_info(path).type
        except OSError as error:
            raise StorageError(f"{uri}: {error}") from None
    with s3_errors(uri):
        info = fs.get_file_info(path)
        if info.type == pafs.FileType.NotFound:
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
        with s3_errors(uri, "list"):
            for page in pages:
                for item in page.get("Contents", []):
                    if not item["Key"].endswith("/"):
                        yield FileEntry(f"{S3_SCHEME}{bucket}/{item['Key']}", item["Size"])
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


def list_names(uri: str) -> set[str]:
    """Names of the files directly in the folder or prefix ``uri``: one listing, no recursion."""
    if is_s3(uri):
        bucket, key = split_s3(uri)
        prefix = key.rstrip("/") + "/" if key else ""
        paginator = s3_client().get_paginator("list_objects_v2")
        with s3_errors(uri, "list"):
            pages = paginator.paginate(Bucket=bucket, Prefix=prefix, Delimiter="/")
            return {
                item["Key"][len(prefix) :] for page in pages for item in page.get("Contents", [])
            }
    try:
        with os.scandir(normalize(uri)) as scan:
            return {entry.name for entry in scan if entry.is_file()}
    except FileNotFoundError:
        return set()
    except OSError as error:
        raise StorageError(f"{uri}: cannot list: {error}") from None


def delete_tree(uri: str) -> None:
    """Remove every file under ``uri``, and the local folder itself."""
    if not is_s3(uri):
        shutil.rmtree(normalize(uri), ignore_errors=True)
        return
    for entry in list(iter_files(uri)):
        delete(entry.uri)


def open_input(uri: str) -> BinaryIO:
    """A sequential binary stream; it never loads the whole object into memory."""
    fs, path = arrow_filesystem(uri)
    if is_s3(uri):
        with s3_errors(uri, "open"):
            return fs.open_input_stream(path)
    try:
        return fs.open_input_stream(path)
    except OSError as error:
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
    with s3_errors(uri, "read"):
        return s3_client().get_object(Bucket=bucket, Key=key)["Body"].read()


def read_json(uri: str) -> Any:
    try:
        return json.loads(read_bytes(uri))
    except json.JSONDecodeError as error:
        raise StorageError(f"{uri}: not valid JSON: {error}") from error


def _no_staging(uri: str) -> str | None:
    return None


# Where the temporary files of a write to a URI go: ``core.outputs`` answers with the staging
# folder of the held output that contains it; None puts them beside the target.
_staging_lookup: Callable[[str], str | None] = _no_staging


def set_staging_lookup(lookup: Callable[[str], str | None]) -> None:
    global _staging_lookup
    _staging_lookup = lookup


def _sep(uri: str) -> str:
    return "/" if is_s3(uri) else os.sep


def make_dirs(directory: str, uri: str) -> None:
    try:
        os.makedirs(directory, exist_ok=True)
    except (FileExistsError, NotADirectoryError):
        raise StorageError(
            f"{uri}: cannot create {directory}: it, or a folder above it, is a file"
        ) from None
    except OSError as error:
        raise StorageError(f"{uri}: cannot create {directory}: {error.strerror}") from None


@contextlib.contextmanager
def atomic_output(uri: str) -> Iterator[str]:
    """Yield a local path to write; publish it at ``uri`` only if the block succeeds.

    The temporary file ends in ``.tmp``, never in the final extension: a reader that
    globs a dataset folder for ``*.parquet`` must not pick up a half-written shard. While
    a run holds the lock of an output containing ``uri``, it lives in that output's
    staging folder, which the next run of the same output clears if this one is killed.
    """
    staging = _staging_lookup(uri)
    if is_s3(uri):
        bucket, key = split_s3(uri)
        handle, tmp_path = tempfile.mkstemp(prefix=".embedpipe-", suffix=TMP_SUFFIX, dir=staging)
        os.close(handle)
        try:
            yield tmp_path
            # upload_file aborts its multipart upload on failure: no partial object appears.
            with s3_errors(uri, "write"):
                s3_client().upload_file(tmp_path, bucket, key)
        finally:
            with contextlib.suppress(FileNotFoundError):
                os.remove(tmp_path)
        return
    final_path = normalize(uri)
    directory = os.path.dirname(final_path)
    make_dirs(directory, uri)
    if os.path.isdir(final_path):
        raise StorageError(f"{uri}: cannot write a file there: it is a folder")
    handle, tmp_path = tempfile.mkstemp(
        prefix=f".{os.path.basename(final_path)}.", suffix=TMP_SUFFIX, dir=staging or directory
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
    if not is_s3(uri):
        with contextlib.suppress(FileNotFoundError):
            fs.delete_file(path)
        return
    with s3_errors(uri, "delete"), contextlib.suppress(FileNotFoundError):
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


def is_within(a: str, b: str) -> bool:
    """``a`` is ``b`` or lies inside it (both normalised)."""
    return a == b or a.startswith(b.rstrip(_sep(b)) + _sep(b))


def _resolved(uri: str) -> str:
    return normalize(uri) if is_s3(uri) else os.path.realpath(normalize(uri))


def check_output_apart(out_uri: str, input_uris: list[str | None]) -> None:
    """Refuse an output that is an input, lies inside one or contains one: writing it
    would destroy or change what the run reads."""
    out = _resolved(out_uri)
    if not is_s3(out) and os.path.isfile(out):
        raise StorageError(f"{out_uri}: is a file; the output must be a folder (or s3:// prefix)")
    for input_uri in input_uris:
        if not input_uri:
            continue
        source = _resolved(input_uri)
        if out == source:
            problem = "is also an input"
        elif is_within(out, source):
            problem = f"lies inside the input {input_uri}"
        elif is_within(source, out):
            problem = f"contains the input {input_uri}"
        else:
            continue
        raise StorageError(
            f"{out_uri}: the output {problem}; writing it would destroy the input: "
            "choose an output folder apart from every input"
        )
