"""A damaged weights file (truncated, empty, not safetensors) is one error naming it,
found by opening each safetensors file of the source, instead of safetensors' traceback
that names no file."""

from __future__ import annotations

import contextlib
import glob
import os
from collections.abc import Iterator

from embedpipe.core import storage
from embedpipe.models.registry import ModelError

LOCAL_DIR = "local-dir:"


def _local(source: str) -> str:
    path = source[len(LOCAL_DIR) :] if source.startswith(LOCAL_DIR) else source
    if storage.is_s3(path):
        from embedpipe.models.loading import fetch_weights

        return fetch_weights(path)
    return path


def damaged_file(source: str) -> tuple[str, str] | None:
    """(file, reason) of the first safetensors file of ``source`` that does not open (an
    empty, truncated or foreign file; reads headers only, so it is cheap)."""
    from safetensors import safe_open

    local = _local(source)
    if os.path.isdir(local):
        files = sorted(glob.glob(os.path.join(local, "*.safetensors")))
    else:
        files = [local] if local.endswith(".safetensors") and os.path.isfile(local) else []
    for path in files:
        try:
            with safe_open(path, framework="pt"):  # checks the header covers the file
                pass
        except Exception as error:  # SafetensorError, OSError
            shown = path if local == source else path.replace(local, source.rstrip("/"), 1)
            return shown, f"{type(error).__name__}: {error}".splitlines()[0]
    return None


def _damaged_error(path: str, reason: str) -> ModelError:
    return ModelError(
        f"{path}: damaged weights file ({reason}); it is truncated or not a safetensors "
        "file: copy or save the model again"
    )


def check_weights_files(source: str) -> None:
    """A ModelError naming the first damaged safetensors file of ``source``."""
    found = damaged_file(source)
    if found:
        raise _damaged_error(*found)


@contextlib.contextmanager
def damaged_weights_named(source: str) -> Iterator[None]:
    """Turn a safetensors error while loading ``source`` into a ModelError naming the file."""
    from safetensors import SafetensorError

    try:
        yield
    except SafetensorError as error:
        found = damaged_file(source) if source else None
        raise _damaged_error(*(found or (source, str(error).splitlines()[0]))) from None
