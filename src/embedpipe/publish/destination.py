"""Where a published model goes: refuse a folder (or prefix) holding anything but a
previous publish of the same checkpoint, then move the staged files in, the config file
last. Every loader (open_clip's ``local-dir:``, transformers, embedpipe) starts from that
config, which records the checkpoint and the file list: a reader sees no model, or a
whole one, never a mix of two."""

from __future__ import annotations

import contextlib
import json
import os
import shutil
from pathlib import Path

from embedpipe.core import datasets, storage
from embedpipe.models.identity import PUBLISH_RECORD, PUBLISHED_CONFIGS, publish_record


def _present(out_uri: str) -> list[str]:
    """Names (relative paths) of what ``out_uri`` holds, its ``.embedpipe/`` side folder
    (the output's lock) aside."""
    if storage.is_s3(out_uri):
        prefix = storage.normalize(out_uri) + "/"
        names = [entry.uri[len(prefix) :] for entry in storage.list_files(out_uri)]
    elif os.path.isdir(out_uri):
        names = _files_under(Path(out_uri), skip=datasets.SIDE_DIR)
    else:
        return []
    return sorted(n for n in names if n.split("/")[0] != datasets.SIDE_DIR)


def _files_under(folder: Path, skip: str = "") -> list[str]:
    """Relative paths (``a/b``) of the files under ``folder``, and of its empty folders;
    a top-level ``skip`` folder aside."""
    names = []
    for path in sorted(folder.rglob("*")):
        relative = path.relative_to(folder).as_posix()
        if skip and relative.split("/")[0] == skip:
            continue
        if path.is_file() or (path.is_dir() and not any(path.iterdir())):
            names.append(relative)
    return names


def _move_order(name: str, config_name: str) -> tuple[bool, bool, str]:
    """Weights before the config file that names them complete; the top one last."""
    return name == config_name, os.path.basename(name) in PUBLISHED_CONFIGS, name


def _record_at(out_uri: str, names: list[str]) -> dict | None:
    for name in PUBLISHED_CONFIGS:
        if name in names:
            if not storage.is_s3(out_uri):
                return publish_record(out_uri)
            try:
                config = storage.read_json(storage.join(out_uri, name))
            except storage.StorageError:
                return None
            record = config.get(PUBLISH_RECORD) if isinstance(config, dict) else None
            return record if isinstance(record, dict) else None
    return None


def check_destination(out_uri: str, identity: str) -> list[str]:
    """The files a previous publish of this checkpoint left at ``out_uri`` (to be replaced);
    a ValueError naming the folder when it holds anything else."""
    names = _present(out_uri)
    if not names:
        return []
    record = _record_at(out_uri, names)
    shown = ", ".join(names[:4]) + (", ..." if len(names) > 4 else "")
    if record is None:
        raise ValueError(
            f"--out {out_uri}: not empty ({shown}) and not a published model; choose an empty "
            "folder: publishing would overwrite these files"
        )
    if record.get("checkpoint") != identity:
        raise ValueError(
            f"--out {out_uri}: holds the published model of another checkpoint "
            f"({record.get('checkpoint', 'unknown')[:19]}...); publish into an empty folder, "
            "never over another model"
        )
    foreign = sorted(set(names) - set(record.get("files") or []))
    if foreign:
        raise ValueError(
            f"--out {out_uri}: a previous publish of this checkpoint, plus files it did not "
            f"write ({', '.join(foreign[:4])}); remove them or choose an empty folder"
        )
    return names


def record_publish(staging: Path, config_name: str, identity: str) -> list[str]:
    """Write the publish record (checkpoint identity, file list) into the staged config
    file; the sorted file names."""
    files = _files_under(staging)
    path = staging / config_name
    config = json.loads(path.read_text(encoding="utf-8"))
    config[PUBLISH_RECORD] = {"checkpoint": identity, "files": files}
    path.write_text(json.dumps(config, indent=2, sort_keys=True) + "\n", encoding="utf-8")
    return files


def move_in(staging: Path, out_uri: str, config_name: str, previous: list[str]) -> None:
    """Each staged file to ``out_uri`` (an atomic replace or a whole-object upload), the
    config last; then what the previous publish had and this one does not."""
    files = sorted(_files_under(staging), key=lambda name: _move_order(name, config_name))
    for name in files:
        with storage.atomic_output(storage.join(out_uri, name)) as target:
            shutil.copyfile(staging / name, target)
    for name in sorted(set(previous) - set(files)):
        storage.delete(storage.join(out_uri, name))
        parent = os.path.dirname(name)
        if parent and not storage.is_s3(out_uri):  # a subfolder it emptied goes too
            with contextlib.suppress(OSError):
                os.removedirs(os.path.join(out_uri, parent))
