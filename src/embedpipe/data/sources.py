"""Enumerate image files from folders, tar and zip archives and S3 prefixes, in a stable order.

A layout places every image by its relative path; the PerVA layout expects
the last components to follow one of::

    <category>/<concept>/<file>
    <split>/<category>/<concept>/<file>      (split is one of split_dirnames)

(the ImageNet and COCO layouts live in ``known_sources``).

Tar archives are read as a stream (``r|*``): members are never written to
disk and the archive is never held in memory whole. Members that are links,
devices, absolute paths or climb out with ``..`` are rejected, not read; so is
a later member with the name of an earlier one (the first is kept, where
``tar -x`` would keep the last). In folders, symlinks are followed only where
they stay inside the folder. Files and members over ``max_image_bytes`` are
rejected by the size their listing or tar header gives, before any byte is read.
Zip archives (COCO's ``val2017.zip``) are read in place through their central
directory, in name order, with the same rejections; a member's declared size
is checked before it is decompressed, and decompression stops at that size.
"""

from __future__ import annotations

import os
import posixpath
import stat
import tarfile
import zipfile
import zlib
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass, field
from typing import Any, Protocol

import pyarrow.fs as pafs

from embedpipe.core import storage
from embedpipe.core.storage import StorageError

IMAGE_EXTENSIONS = frozenset(
    {".jpg", ".jpeg", ".png", ".webp", ".bmp", ".gif", ".tif", ".tiff", ".jfif"}
)
TAR_SUFFIXES = (".tar", ".tar.gz", ".tgz")
ZIP_SUFFIX = ".zip"


class LayoutError(ValueError):
    """A source does not follow the category/concept layout, or holds no images."""


class MemberRejected(Exception):
    """A layout refuses one image: it is listed as rejected and the run goes on."""


@dataclass(frozen=True)
class Placement:
    split: str | None
    category: str
    concept: str
    # Values of the optional image columns a layout provides (ImageNet's label, COCO's captions).
    columns: Mapping[str, Any] = field(default_factory=dict)


class Layout(Protocol):
    def place(self, relative_path: str, where: str) -> Placement:
        """Where the image at ``relative_path`` belongs; raises LayoutError (the run
        stops, naming ``where``) or MemberRejected (this image only is rejected)."""


@dataclass(frozen=True)
class Member:
    """One file found in a source: an image candidate, or a rejected entry."""

    source: str  # the file's URI, or ``archive::member`` inside a tar
    relative_path: str  # path relative to the source root (for catalog --relative)
    placement: Placement | None
    read: Callable[[], bytes] | None
    rejected_reason: str | None = None
    # Signal and scalar values the source holds beside the image (a Hugging Face dataset's).
    signals: Mapping[str, Any] = field(default_factory=dict)


def is_tar(uri: str) -> bool:
    return uri.lower().endswith(TAR_SUFFIXES)


def is_zip(uri: str) -> bool:
    return uri.lower().endswith(ZIP_SUFFIX)


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


@dataclass(frozen=True)
class PervaLayout:
    split_dirnames: tuple[str, ...]
    strip_components: int

    def place(self, relative_path: str, where: str) -> Placement:
        return place(relative_path, self.split_dirnames, self.strip_components, where)


def unsafe_member_reason(member: tarfile.TarInfo) -> str | None:
    if member.issym() or member.islnk():
        return "link member (symlinks and hard links are not followed)"
    if not (member.isfile() or member.isdir()):
        return "special file member (device, fifo or other)"
    return _unsafe_name_reason(member.name)


def unsafe_zip_member_reason(member: zipfile.ZipInfo) -> str | None:
    if stat.S_ISLNK(member.external_attr >> 16):
        return "link member (symlinks and hard links are not followed)"
    if member.flag_bits & 0x1:
        return "encrypted member"
    return _unsafe_name_reason(member.filename)


def _unsafe_name_reason(name: str) -> str | None:
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
            f"({', '.join(TAR_SUFFIXES)}); a zip is read only as COCO's val2017.zip, "
            "beside annotations/ in the folder given as the source"
        )
    return normalized


class SourceReader:
    """Yields the members of sources in order; counts what it skips."""

    def __init__(self, max_image_bytes: int) -> None:
        self.max_image_bytes = max_image_bytes
        self.skipped_non_image = 0
        self._saw_image = False

    def members(self, source: str, layout: Layout) -> Iterator[Member]:
        """The members of a folder, S3 prefix, tar or zip archive, placed by ``layout``."""
        self._saw_image = False
        if is_tar(source):
            walk = self._tar_members
        elif is_zip(source):
            walk = self._zip_members
        else:
            walk = self._tree_members
        yield from walk(source, layout)
        if not self._saw_image:
            raise LayoutError(f"{source}: no images found (looked for {_extensions_text()})")

    def _is_image(self, name: str) -> bool:
        if name.startswith(".") or not is_image_name(name):
            self.skipped_non_image += 1
            return False
        self._saw_image = True
        return True

    def _size_reason(self, size: int) -> str | None:
        if size > self.max_image_bytes:
            return f"file is {size} bytes, over max_image_bytes={self.max_image_bytes}"
        return None

    def _tree_members(self, root: str, layout: Layout) -> Iterator[Member]:
        prefix = root.rstrip("/") + "/"
        for uri, size, link_reason in _list_tree(root):
            relative = uri[len(prefix) :]
            if link_reason:
                yield Member(uri, relative, None, None, rejected_reason=link_reason)
                continue
            if not self._is_image(relative.rsplit("/", 1)[-1]):
                continue
            try:
                placement = layout.place(relative, uri)
            except MemberRejected as rejected:
                yield Member(uri, relative, None, None, rejected_reason=str(rejected))
                continue
            reason = self._size_reason(size)
            if reason:
                yield Member(uri, relative, placement, None, rejected_reason=reason)
                continue
            yield Member(uri, relative, placement, _reader_for(uri))

    def _tar_members(self, archive: str, layout: Layout) -> Iterator[Member]:
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
                    yield from self._read_tar(tar, archive, layout)
                except (tarfile.TarError, EOFError, OSError, zlib.error) as error:
                    # Members read so far stay good; the rest of the archive is reported.
                    reason = f"archive is truncated or corrupt past this point: {error}"
                    yield Member(archive, "", None, None, rejected_reason=reason)

    def _read_tar(self, tar: tarfile.TarFile, archive: str, layout: Layout) -> Iterator[Member]:
        seen_names: set[str] = set()
        for info in tar:
            source = f"{archive}::{info.name}"
            reason = unsafe_member_reason(info)
            if reason:
                yield Member(source, info.name, None, None, rejected_reason=reason)
                continue
            if info.isdir() or not self._is_image(posixpath.basename(info.name)):
                continue
            try:
                placement = layout.place(info.name, source)
            except MemberRejected as rejected:
                yield Member(source, info.name, None, None, rejected_reason=str(rejected))
                continue
            reason = self._first_of_name(seen_names, info.name) or self._size_reason(info.size)
            if reason:
                yield Member(source, info.name, placement, None, rejected_reason=reason)
                continue
            data = tar.extractfile(info).read()
            yield Member(source, info.name, placement, lambda data=data: data)

    def _zip_members(self, archive: str, layout: Layout) -> Iterator[Member]:
        fs, path = storage.arrow_filesystem(archive)
        try:
            handle = fs.open_input_file(path)
        except OSError as error:
            raise StorageError(f"{archive}: cannot open: {error}") from error
        with handle:
            try:
                opened = zipfile.ZipFile(handle)
            except (zipfile.BadZipFile, OSError, EOFError) as error:
                raise LayoutError(f"{archive}: not a readable zip archive: {error}") from error
            with opened:
                yield from self._read_zip(opened, archive, layout)

    def _read_zip(self, opened: zipfile.ZipFile, archive: str, layout: Layout) -> Iterator[Member]:
        seen_names: set[str] = set()
        # Name order, as a folder is walked; sorting is stable, so of two members of one
        # name the archive's first stays first.
        for info in sorted(opened.infolist(), key=lambda info: info.filename):
            name = info.filename
            source = f"{archive}::{name}"
            reason = unsafe_zip_member_reason(info)
            if reason:
                yield Member(source, name, None, None, rejected_reason=reason)
                continue
            if info.is_dir() or not self._is_image(posixpath.basename(name)):
                continue
            try:
                placement = layout.place(name, source)
            except MemberRejected as rejected:
                yield Member(source, name, None, None, rejected_reason=str(rejected))
                continue
            reason = self._first_of_name(seen_names, name) or self._size_reason(info.file_size)
            if not reason:
                try:
                    # ZipExtFile stops at the declared size, so the cap above holds.
                    with opened.open(info) as member:
                        data = member.read()
                except (zipfile.BadZipFile, NotImplementedError, OSError, EOFError) as error:
                    reason = f"cannot read zip member: {error}"
                except zlib.error as error:
                    reason = f"cannot read zip member: corrupt compressed data: {error}"
            if reason:
                yield Member(source, name, placement, None, rejected_reason=reason)
                continue
            yield Member(source, name, placement, lambda data=data: data)

    @staticmethod
    def _first_of_name(seen_names: set[str], name: str) -> str | None:
        key = posixpath.normpath(name)
        if key in seen_names:
            return "duplicate member name (the archive's first member of this name is kept)"
        seen_names.add(key)
        return None


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
