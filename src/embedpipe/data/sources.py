"""Enumerate image files from folders, tar archives and S3 prefixes, in a stable order.

Every image is reached through a relative path whose last components follow
one of the two PerVA layouts::

    <category>/<concept>/<file>
    <split>/<category>/<concept>/<file>      (split is one of split_dirnames)

Tar archives are read as a stream (``r|*``): members are never written to
disk and the archive is never held in memory whole. Members that are links,
devices, absolute paths or climb out with ``..`` are rejected, not read; so is
a later member with the name of an earlier one (the first is kept, where
``tar -x`` would keep the last). In folders, symlinks are followed only where
they stay inside the folder. Files and members over ``max_image_bytes`` are
rejected by the size their listing or tar header gives, before any byte is read.
"""

from __future__ import annotations

import os
import posixpath
import tarfile
import zlib
from collections.abc import Callable, Iterator
from dataclasses import dataclass

import pyarrow.fs as pafs

from embedpipe.core import storage
from embedpipe.core.storage import StorageError

IMAGE_EXTENSIONS = frozenset(
    {".jpg", ".jpeg", ".png", ".webp", ".bmp", ".gif", ".tif", ".tiff", ".jfif"}
)
TAR_SUFFIXES = (".tar", ".tar.gz", ".tgz")


class LayoutError(ValueError):
    """A source does not follow the category/concept layout, or holds no images."""


@dataclass(frozen=True)
class Placement:
    split: str | None
    category: str
    concept: str


@dataclass(frozen=True)
class Member:
    """One file found in a source: an image candidate, or a rejected entry."""

    source: str  # the file's URI, or ``archive::member`` inside a tar
    relative_path: str  # path relative to the source root (for catalog --relative)
    placement: Placement | None
    read: Callable[[], bytes] | None
    rejected_reason: str | None = None


def is_tar(uri: str) -> bool:
    return uri.lower().endswith(TAR_SUFFIXES)


def is_image_name(name: str) -> bool:
    return os.path.splitext(name)[1].lower() in IMAGE_EXTENSIONS


def place(
    relative_path: str, split_dirnames: tuple[str, ...], strip_components: int, where: str
) -> Placement:
    """Map a relative path to split/category/concept, or raise naming ``where``."""
    parts = [part for part in relative_path.split("/") if part not in ("", ".")]
    parts = parts[strip_components:]
    if len(parts) == 4 and parts[0] in split_dirnames:
        return Placement(parts[0], parts[1], parts[2])
    if len(parts) == 3:
        return Placement(None, parts[0], parts[1])
    expected = (
        "<category>/<concept>/<image> or <split>/<category>/<concept>/<image> with split in "
        + "/".join(split_dirnames)
    )
    raise LayoutError(f"{where}: image is not in the expected layout {expected}")


def unsafe_member_reason(member: tarfile.TarInfo) -> str | None:
    name = member.name
    if member.issym() or member.islnk():
        return "link member (symlinks and hard links are not followed)"
    if not (member.isfile() or member.isdir()):
        return "special file member (device, fifo or other)"
    if name.startswith("/") or posixpath.isabs(name) or (len(name) > 1 and name[1] == ":"):
        return "absolute path member"
    if ".." in name.replace("\\", "/").split("/"):
        return "member path climbs out of the archive with '..'"
    return None


def resolve_source(uri: str) -> str:
    """Check that a source exists and normalise it; raise naming the path otherwise."""
    normalized = storage.normalize(uri)
    kind = storage.file_type(normalized)
    if kind == pafs.FileType.NotFound:
        raise LayoutError(f"{uri}: source does not exist")
    if kind == pafs.FileType.File and not is_tar(normalized):
        raise LayoutError(
            f"{uri}: a source must be a folder, an s3:// prefix or a tar archive "
            f"({', '.join(TAR_SUFFIXES)})"
        )
    return normalized


class SourceReader:
    """Yields the members of sources in order; counts what it skips."""

    def __init__(
        self, split_dirnames: tuple[str, ...], strip_components: int, max_image_bytes: int
    ) -> None:
        self.split_dirnames = split_dirnames
        self.strip_components = strip_components
        self.max_image_bytes = max_image_bytes
        self.skipped_non_image = 0

    def members(self, source: str) -> Iterator[Member]:
        found_image = False
        walk = self._tar_members if is_tar(source) else self._tree_members
        for member in walk(source):
            found_image = found_image or member.placement is not None
            yield member
        if not found_image:
            raise LayoutError(f"{source}: no images found (looked for {_extensions_text()})")

    def _place(self, relative_path: str, where: str) -> Placement:
        return place(relative_path, self.split_dirnames, self.strip_components, where)

    def _size_reason(self, size: int) -> str | None:
        if size > self.max_image_bytes:
            return f"file is {size} bytes, over max_image_bytes={self.max_image_bytes}"
        return None

    def _tree_members(self, root: str) -> Iterator[Member]:
        prefix = root.rstrip("/") + "/"
        for uri, size, link_reason in _list_tree(root):
            relative = uri[len(prefix) :]
            if link_reason:
                yield Member(uri, relative, None, None, rejected_reason=link_reason)
                continue
            name = relative.rsplit("/", 1)[-1]
            if name.startswith(".") or not is_image_name(name):
                self.skipped_non_image += 1
                continue
            placement = self._place(relative, uri)
            reason = self._size_reason(size)
            if reason:
                yield Member(uri, relative, placement, None, rejected_reason=reason)
                continue
            yield Member(uri, relative, placement, _reader_for(uri))

    def _tar_members(self, archive: str) -> Iterator[Member]:
        # The raw bytes: tarfile recognises gzip itself and says so when a .tar.gz is not one
        # (pyarrow's own decompression would fail with a bare zlib error).
        fs, path = storage.arrow_filesystem(archive)
        try:
            stream = fs.open_input_stream(path, compression=None, buffer_size=1 << 20)
        except OSError as error:
            raise StorageError(f"{archive}: cannot open: {error}") from error
        with stream:
            try:
                tar = tarfile.open(fileobj=stream, mode="r|*")  # noqa: SIM115 (closed below)
            except (tarfile.TarError, EOFError, zlib.error) as error:
                raise LayoutError(f"{archive}: not a readable tar archive: {error}") from error
            with tar:
                try:
                    yield from self._read_tar(tar, archive)
                except (tarfile.TarError, EOFError, OSError, zlib.error) as error:
                    # Members read so far stay good; the rest of the archive is reported.
                    reason = f"archive is truncated or corrupt past this point: {error}"
                    yield Member(archive, "", None, None, rejected_reason=reason)

    def _read_tar(self, tar: tarfile.TarFile, archive: str) -> Iterator[Member]:
        seen_names: set[str] = set()
        for info in tar:
            source = f"{archive}::{info.name}"
            reason = unsafe_member_reason(info)
            if reason:
                yield Member(source, info.name, None, None, rejected_reason=reason)
                continue
            if info.isdir():
                continue
            name = posixpath.basename(info.name)
            if name.startswith(".") or not is_image_name(name):
                self.skipped_non_image += 1
                continue
            placement = self._place(info.name, source)
            key = posixpath.normpath(info.name)
            if key in seen_names:
                reason = "duplicate member name (the archive's first member of this name is kept)"
            else:
                seen_names.add(key)
                reason = self._size_reason(info.size)
            if reason:
                yield Member(source, info.name, placement, None, rejected_reason=reason)
                continue
            data = tar.extractfile(info).read()
            yield Member(source, info.name, placement, lambda data=data: data)


def _list_tree(root: str) -> Iterator[tuple[str, int, str | None]]:
    """(uri, size, reason it is rejected) for every file under a folder or S3 prefix."""
    if storage.is_s3(root):
        for entry in storage.iter_files(root):
            yield entry.uri, entry.size, None
        return
    real_root = os.path.realpath(root)
    yield from _walk_folder(root, real_root, (real_root,))


def _walk_folder(
    directory: str, real_root: str, ancestors: tuple[str, ...]
) -> Iterator[tuple[str, int, str | None]]:
    """Sorted and lazy; a symlink is followed only to a place inside the source folder
    (a link that leaves it could read any file the process can)."""
    try:
        with os.scandir(directory) as scan:
            entries = sorted(scan, key=lambda entry: entry.name)
    except OSError as error:
        raise StorageError(f"{directory}: cannot list: {error}") from error
    for entry in entries:
        if entry.is_symlink():
            target = os.path.realpath(entry.path)
            if os.path.commonpath([target, real_root]) != real_root:
                yield entry.path, 0, "symlink leads outside the source folder (not followed)"
            elif os.path.isdir(target):
                if target in ancestors:
                    yield entry.path, 0, "symlink loop (not followed)"
                else:
                    yield from _walk_folder(entry.path, real_root, (*ancestors, target))
            elif os.path.isfile(target):
                yield entry.path, os.path.getsize(target), None
            else:
                yield entry.path, 0, "broken symlink"
        elif entry.is_dir(follow_symlinks=False):
            real = os.path.realpath(entry.path)
            yield from _walk_folder(entry.path, real_root, (*ancestors, real))
        elif entry.is_file(follow_symlinks=False):
            yield entry.path, entry.stat(follow_symlinks=False).st_size, None


def _reader_for(uri: str) -> Callable[[], bytes]:
    return lambda: storage.read_bytes(uri)


def _extensions_text() -> str:
    return ", ".join(sorted(IMAGE_EXTENSIONS))
