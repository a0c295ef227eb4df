"""One writer per output: a lock file created only if absent, refreshed while the run lives.

Locally the lock is created with ``O_CREAT | O_EXCL``; on S3 with a conditional
``PutObject`` (``If-None-Match: *``), refreshed and removed with ``If-Match`` on its
ETag, so two runs can never both believe they hold it. The lock records the pid,
host and start time of its run. A lock is stale, and taken over, when its process
is gone (same host) or when it has not been refreshed for ``LEASE_SECONDS`` (a run
killed with ``kill -9`` on another machine); otherwise the second run stops with
an error naming the lock and how to remove it.
"""

from __future__ import annotations

import contextlib
import datetime as dt
import json
import logging
import os
import socket
import sys
import threading
import time
import uuid
from dataclasses import dataclass

from embedpipe.core import storage

log = logging.getLogger(__name__)

# A live run refreshes its lock every LEASE_SECONDS / REFRESHES_PER_LEASE seconds.
LEASE_SECONDS = 300.0
REFRESHES_PER_LEASE = 5
TAKEOVER_ATTEMPTS = 5


class OutputLockedError(storage.StorageError):
    """Another run is writing the same output."""


@dataclass(frozen=True)
class Holder:
    """What a lock says about the run that holds it, and how long since it was refreshed."""

    record: dict
    age_seconds: float

    def stale_reason(self) -> str | None:
        pid, host = self.record.get("pid"), self.record.get("host")
        if host == socket.gethostname() and isinstance(pid, int) and not _process_alive(pid):
            return f"its process {pid} is gone"
        if self.age_seconds > LEASE_SECONDS:
            return f"it was not refreshed for {self.age_seconds:.0f} s"
        return None

    def describe(self) -> str:
        record = self.record
        return (
            f"pid {record.get('pid', '?')} on host {record.get('host', '?')}, "
            f"started {record.get('started', '?')}, refreshed {self.age_seconds:.0f} s ago"
        )


def _process_alive(pid: int) -> bool:
    if pid == os.getpid():
        return True
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # alive, another user's
        return True
    return True


def _now() -> str:
    return dt.datetime.now(dt.UTC).isoformat(timespec="seconds")


class OutputLock:
    """The lock of the output at ``out_uri``, kept in the file or object ``lock_uri``."""

    def __init__(self, out_uri: str, lock_uri: str) -> None:
        self.out_uri = out_uri
        self.lock_uri = lock_uri
        self.record = {
            "pid": os.getpid(),
            "host": socket.gethostname(),
            "started": _now(),
            "token": uuid.uuid4().hex,
            "command": " ".join(sys.argv)[:300],
        }
        self._etag: str | None = None
        self._stop = threading.Event()
        self._refresher: threading.Thread | None = None
        self.lost = False

    # -- public -------------------------------------------------------------------------

    def acquire(self) -> None:
        for _ in range(TAKEOVER_ATTEMPTS):
            if self._create():
                self._start_refreshing()
                return
            holder = self._holder()
            if holder is None:  # removed between our attempt and the read: try again
                continue
            reason = holder.stale_reason()
            if reason is None:
                raise OutputLockedError(
                    f"{self.out_uri}: another embedpipe run is writing this output "
                    f"({holder.describe()}; lock {self.lock_uri}). Wait for it to finish; "
                    f"if that run is gone, delete {self.lock_uri} and run again (a lock not "
                    f"refreshed for {LEASE_SECONDS:.0f} s is taken over on its own)"
                )
            if self._remove_stale(holder):
                log.warning("took over the stale lock %s (%s)", self.lock_uri, reason)
        raise OutputLockedError(
            f"{self.out_uri}: could not take the lock {self.lock_uri}: other runs keep "
            "taking it; run one at a time"
        )

    def verify_held(self) -> None:
        """Raise unless this run still holds the lock (call before publishing a manifest)."""
        if self.lost or not self._still_ours():
            self.lost = True
            raise OutputLockedError(
                f"{self.out_uri}: this run lost its lock {self.lock_uri} to another run "
                f"(not refreshed for {LEASE_SECONDS:.0f} s?); nothing more was published"
            )

    def release(self) -> None:
        self._stop.set()
        if self._refresher is not None:
            self._refresher.join()
        if not self.lost:
            self._delete_if_ours()

    # -- shared by both stores ----------------------------------------------------------

    def _start_refreshing(self) -> None:
        interval = LEASE_SECONDS / REFRESHES_PER_LEASE
        self._refresher = threading.Thread(
            target=self._refresh_loop, args=(interval,), name="embedpipe-lock", daemon=True
        )
        self._refresher.start()

    def _refresh_loop(self, interval: float) -> None:
        while not self._stop.wait(interval):
            try:
                if not self._refresh():
                    self.lost = True
                    log.error("lost the lock %s to another run", self.lock_uri)
                    return
            except Exception as error:  # a refresh that fails now may succeed next time
                log.warning("could not refresh the lock %s: %s", self.lock_uri, error)

    def _payload(self) -> bytes:
        return json.dumps({**self.record, "refreshed": _now()}, sort_keys=True).encode()

    # -- local files and S3 objects -----------------------------------------------------

    def _create(self) -> bool:
        if storage.is_s3(self.lock_uri):
            return self._s3_create()
        path = storage.normalize(self.lock_uri)
        storage.make_dirs(os.path.dirname(path), self.out_uri)
        try:
            handle = os.open(path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
        except FileExistsError:
            return False
        except OSError as error:
            raise storage.StorageError(
                f"{self.lock_uri}: cannot create: {error.strerror}"
            ) from None
        with os.fdopen(handle, "wb") as out:
            out.write(self._payload())
            out.flush()
            os.fsync(out.fileno())
        return True

    def _holder(self) -> Holder | None:
        if storage.is_s3(self.lock_uri):
            return self._s3_holder()
        path = storage.normalize(self.lock_uri)
        try:
            with open(path, "rb") as handle:
                data = handle.read()
            age = time.time() - os.stat(path).st_mtime
        except FileNotFoundError:
            return None
        return Holder(_parse(data), age)

    def _still_ours(self) -> bool:
        if storage.is_s3(self.lock_uri):
            return self._s3_etag() == self._etag
        try:
            with open(storage.normalize(self.lock_uri), "rb") as handle:
                return _parse(handle.read()).get("token") == self.record["token"]
        except FileNotFoundError:
            return False

    def _refresh(self) -> bool:
        if storage.is_s3(self.lock_uri):
            return self._s3_put(IfMatch=self._etag)
        if not self._still_ours():
            return False
        os.utime(storage.normalize(self.lock_uri))
        return True

    def _remove_stale(self, holder: Holder) -> bool:
        if storage.is_s3(self.lock_uri):
            return self._s3_delete(holder.record.get("_etag"))
        # Move the lock aside first: only one of several runs taking it over succeeds, and
        # one that moved a fresh lock (taken meanwhile) puts it back.
        path = storage.normalize(self.lock_uri)
        aside = f"{path}.{self.record['token']}.stale"
        try:
            os.rename(path, aside)
        except FileNotFoundError:
            return False
        try:
            with open(aside, "rb") as handle:
                moved = _parse(handle.read())
            if moved.get("token") != holder.record.get("token"):
                with contextlib.suppress(FileExistsError):
                    os.link(aside, path)
                return False
            return True
        finally:
            os.remove(aside)

    def _delete_if_ours(self) -> None:
        if storage.is_s3(self.lock_uri):
            self._s3_delete(self._etag)
        elif self._still_ours():
            os.remove(storage.normalize(self.lock_uri))

    # -- S3 -----------------------------------------------------------------------------

    def _s3_put(self, **condition) -> bool:
        from botocore.exceptions import ClientError

        bucket, key = storage.split_s3(self.lock_uri)
        try:
            response = storage.s3_client().put_object(
                Bucket=bucket, Key=key, Body=self._payload(), **condition
            )
        except Exception as error:
            if isinstance(error, ClientError) and _precondition_failed(error):
                return False
            with storage.s3_errors(self.out_uri, "take the lock"):
                raise
        self._etag = response["ETag"]
        return True

    def _s3_create(self) -> bool:
        return self._s3_put(IfNoneMatch="*")

    def _s3_holder(self) -> Holder | None:
        from botocore.exceptions import ClientError

        bucket, key = storage.split_s3(self.lock_uri)
        try:
            response = storage.s3_client().get_object(Bucket=bucket, Key=key)
        except Exception as error:
            if isinstance(error, ClientError) and error.response.get("Error", {}).get("Code") in (
                "NoSuchKey",
                "404",
            ):
                return None
            with storage.s3_errors(self.lock_uri, "read"):
                raise
        record = _parse(response["Body"].read())
        record["_etag"] = response["ETag"]
        # Server clock against server clock: the run's own clock may be off.
        server_now = _http_date(response["ResponseMetadata"]["HTTPHeaders"].get("date"))
        age = ((server_now or dt.datetime.now(dt.UTC)) - response["LastModified"]).total_seconds()
        return Holder(record, max(0.0, age))

    def _s3_etag(self) -> str | None:
        from botocore.exceptions import ClientError

        bucket, key = storage.split_s3(self.lock_uri)
        try:
            return storage.s3_client().head_object(Bucket=bucket, Key=key)["ETag"]
        except ClientError:
            return None

    def _s3_delete(self, etag: str | None) -> bool:
        from botocore.exceptions import ClientError

        bucket, key = storage.split_s3(self.lock_uri)
        condition = {"IfMatch": etag} if etag else {}
        try:
            storage.s3_client().delete_object(Bucket=bucket, Key=key, **condition)
        except ClientError as error:
            code = error.response.get("Error", {}).get("Code")
            if code in ("PreconditionFailed", "NoSuchKey", "404"):
                return False
            if code != "NotImplemented" or not etag:
                with storage.s3_errors(self.lock_uri, "delete"):
                    raise
            # A store without conditional deletes: compare, then delete.
            if self._s3_etag() != etag:
                return False
            storage.s3_client().delete_object(Bucket=bucket, Key=key)
        return True


def _precondition_failed(error: BaseException) -> bool:
    from botocore.exceptions import ClientError

    codes = {"PreconditionFailed", "ConditionalRequestConflict", "412", "409"}
    return any(
        isinstance(link, ClientError) and link.response.get("Error", {}).get("Code") in codes
        for link in storage.error_chain(error)
    )


def _parse(data: bytes) -> dict:
    try:
        record = json.loads(data)
    except ValueError:
        return {}
    return record if isinstance(record, dict) else {}


def _http_date(value: str | None) -> dt.datetime | None:
    from email.utils import parsedate_to_datetime

    try:
        return parsedate_to_datetime(value) if value else None
    except (TypeError, ValueError):
        return None
