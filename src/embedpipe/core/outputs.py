"""Who writes an output: its lock, its staging folder, and the stage entries that hold them.

Every output (a dataset, a bundle, a model folder) keeps its side files in a hidden
``.embedpipe/`` folder. One run writes an output at a time: a stage entry decorated with
``writes_output`` holds the output's lock (``.embedpipe/lock``, see ``core.locks``) while it
runs, and keeps its temporary files in the output's staging folder (``.embedpipe/staging/``;
in the system temp folder for an S3 output), which the next run of the same output clears
if a run was killed. What this process holds is kept in one registry here; the held output
that contains a URI is the innermost one (the longest prefix).
"""

from __future__ import annotations

import contextlib
import functools
import hashlib
import inspect
import os
import re
import shutil
import tempfile
import threading
from collections.abc import Callable, Iterator
from dataclasses import dataclass

from embedpipe.core import locks, storage

# Hidden, so readers of the folder skip it; a name starting with "_" is not enough for
# `datasets`, and DuckDB's `*.parquet` glob matches hidden files but not subfolders.
SIDE_DIR = ".embedpipe"
LOCK_NAME = "lock"
STAGING_NAME = "staging"
# Temporary files that writers of older versions left beside their targets.
LEFTOVER_TMP = re.compile(r"^\..*\.tmp$")


def side_path(uri: str, *names: str) -> str:
    """Where a side file of the output at ``uri`` lives: ``URI/.embedpipe/NAME``."""
    return storage.join(storage.normalize(uri), SIDE_DIR, *names)


def staging_folder(out_uri: str) -> str:
    """The staging folder of the output at ``out_uri``, held or not."""
    out_uri = storage.normalize(out_uri)
    if storage.is_s3(out_uri):
        digest = hashlib.sha256(out_uri.encode()).hexdigest()[:16]
        return os.path.join(tempfile.gettempdir(), f"embedpipe-staging-{digest}")
    return side_path(out_uri, STAGING_NAME)


@dataclass
class _Held:
    lock: locks.OutputLock
    staging: str
    depth: int = 1


# Normalised output URI -> what this process holds of it.
_held: dict[str, _Held] = {}
_held_guard = threading.Lock()


def _innermost(uri: str) -> _Held | None:
    """The held output that is or contains ``uri``, the innermost one; None if none."""
    uri = storage.normalize(uri)
    with _held_guard:
        owners = [out for out in _held if storage.is_within(uri, out)]
        return _held[max(owners, key=len)] if owners else None


def staging_dir(uri: str) -> str | None:
    """Where a run holding the output that contains ``uri`` keeps its temporary files."""
    held = _innermost(uri)
    return held.staging if held else None


storage.set_staging_lookup(staging_dir)


def verify_output_held(uri: str) -> None:
    """Raise if this process held the lock of the output that holds ``uri`` and another run
    has taken it over since (call before publishing into a long-running output)."""
    held = _innermost(uri)
    if held is not None:
        held.lock.verify_held()


def _clear_leftovers(out_uri: str, staging: str) -> None:
    """Remove what killed runs of this output left: we hold its lock, so no run is using it."""
    shutil.rmtree(staging, ignore_errors=True)
    if storage.is_s3(out_uri):
        return
    for folder in (out_uri, side_path(out_uri), side_path(out_uri, "progress")):
        for name in storage.list_names(folder):
            if LEFTOVER_TMP.match(name):
                storage.delete(os.path.join(folder, name))


def _remove_if_untouched(out_uri: str) -> None:
    """A run that wrote nothing leaves no folder behind: only the empty side folder its
    lock made (and the output folder itself) are removed, never a file."""
    if storage.is_s3(out_uri):
        return  # S3 has no folders: nothing is left once the lock object is deleted
    for folder in (side_path(out_uri), out_uri):
        with contextlib.suppress(OSError):  # not empty, or already gone: keep it
            os.rmdir(folder)


@contextlib.contextmanager
def output_lock(out_uri: str) -> Iterator[locks.OutputLock]:
    """Hold the lock of the output at ``out_uri`` for the block (re-entrant in a process).

    A second run writing the same output stops with an error naming the lock.
    """
    out_uri = storage.normalize(out_uri)
    with _held_guard:
        held = _held.get(out_uri)
        if held is not None:
            held.depth += 1
        else:
            lock = locks.OutputLock(out_uri, side_path(out_uri, LOCK_NAME))
            lock.acquire()
            try:
                staging = staging_folder(out_uri)
                _clear_leftovers(out_uri, staging)
                storage.make_dirs(staging, out_uri)
            except BaseException:
                lock.release()
                raise
            held = _held[out_uri] = _Held(lock, staging)
    try:
        yield held.lock
    finally:
        with _held_guard:
            held.depth -= 1
            if held.depth == 0:
                del _held[out_uri]
                shutil.rmtree(held.staging, ignore_errors=True)
                held.lock.release()
                _remove_if_untouched(out_uri)


def writes_output(
    out: str = "out_uri",
    inputs: tuple[str, ...] = (),
    writer: Callable[[], bool] = lambda: True,
) -> Callable:
    """Decorate a stage entry: refuse an output that overlaps an input (the parameters named
    in ``inputs``: URIs, lists of URIs or None), then hold the output's lock while it runs
    in the process that writes (``writer()``: all but rank 0 of a distributed run only read)."""

    def decorate(function: Callable) -> Callable:
        signature = inspect.signature(function)

        @functools.wraps(function)
        def run(*args, **kwargs):
            bound = signature.bind(*args, **kwargs)
            input_uris: list[str | None] = []
            for name in inputs:
                value = bound.arguments.get(name)
                input_uris.extend(value if isinstance(value, list | tuple) else [value])
            out_uri = bound.arguments[out]
            storage.check_output_apart(out_uri, input_uris)
            if not writer():
                return function(*args, **kwargs)
            with output_lock(out_uri):
                return function(*args, **kwargs)

        return run

    return decorate
