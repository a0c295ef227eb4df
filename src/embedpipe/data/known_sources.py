"""Sources that are not in the PerVA layout: the ImageNet validation set and COCO captions.

ImageNet (with ``imagenet_meta``, ``--imagenet-meta DIR``): the flat
``ILSVRC2012_img_val.tar`` (streamed like any tar) or a folder of
``ILSVRC2012_val_<8 digits>.JPEG`` at any depth; an image's class comes from its
file number, looked up in the meta folder's ground truth,
``ILSVRC2012_val_synsets.txt`` (line N = the wnid of file N) or Kaggle's
``LOC_val_solution.csv`` (``ImageId,PredictionString``, the wnid first), and its
class name from ``wnid_to_label.json`` or ``LOC_synset_mapping.txt`` (the first
name before a comma). Rows: category ``imagenet``, concept = the wnid, ``label``
= the class name. The output's ``.embedpipe/`` gets ``wnid_to_label.json`` and
``imagenet_class_index.json`` (index = position in sorted wnid order, as in
torchvision and Keras).

COCO: a folder holding ``val2017/`` (or ``val2017.zip``, read in place) and
``annotations/captions_val2017.json``. Rows: category ``coco``, concept = the
image id, ``captions`` = every caption of the image, in file order. An image
the annotations give no caption keeps an empty list (it still serves
image-to-image work; retrieval skips it) and is counted in the report.

Meta that does not fit the images (an unknown wnid, a file number past the
ground truth) stops the run with one line naming the file and line: a wrong
label would otherwise go unnoticed into every metric.
"""

from __future__ import annotations

import csv
import io
import json
import logging
import posixpath
import re
from collections.abc import Sequence
from dataclasses import dataclass, field

import pyarrow.fs as pafs

from embedpipe.config import IngestSettings
from embedpipe.core import datasets, storage
from embedpipe.data.hf_sources import HF_KIND, HfDataset, plan_hf_dataset
from embedpipe.data.sources import Layout, LayoutError, MemberRejected, PervaLayout, Placement

log = logging.getLogger(__name__)

PERVA_KIND = "perva"
IMAGENET_KIND = "imagenet"
COCO_KIND = "coco"
IMAGENET_CATEGORY = "imagenet"
COCO_CATEGORY = "coco"

SYNSETS_TXT = "ILSVRC2012_val_synsets.txt"
SOLUTION_CSV = "LOC_val_solution.csv"
LABELS_JSON = "wnid_to_label.json"
SYNSET_MAPPING_TXT = "LOC_synset_mapping.txt"
CLASS_INDEX_JSON = "imagenet_class_index.json"
COCO_IMAGES = "val2017"
COCO_CAPTIONS = f"annotations/captions_{COCO_IMAGES}.json"

VAL_FILE = re.compile(r"ILSVRC2012_val_(\d{8})\.jpe?g", re.IGNORECASE)
VAL_IMAGE_ID = re.compile(r"ILSVRC2012_val_(\d{8})")
WNID = re.compile(r"n\d{8}")
WNID_EXAMPLE = "a wnid like n01440764"


@dataclass(frozen=True)
class ImageNetMeta:
    ground_truth_uri: str
    wnid_by_number: dict[int, str]
    line_by_number: dict[int, int]  # where each file number's wnid was read
    labels_uri: str
    labels: dict[str, str]  # wnid -> class name, every class of the mapping

    def class_index(self) -> dict[str, list[str]]:
        """``{"0": [wnid, name], ...}`` in sorted wnid order (torchvision's and Keras' index)."""
        return {str(i): [wnid, self.labels[wnid]] for i, wnid in enumerate(sorted(self.labels))}

    def missing(self, number: int, where: str) -> str:
        if self.ground_truth_uri.endswith(SYNSETS_TXT):
            return (
                f"{where}: file number {number} has no line in {self.ground_truth_uri} "
                f"(it has {len(self.wnid_by_number)} lines: fewer synset lines than images, "
                "or the wrong file)"
            )
        return f"{where}: ILSVRC2012_val_{number:08d} is not listed in {self.ground_truth_uri}"


@dataclass(frozen=True)
class ImageNetLayout:
    meta: ImageNetMeta

    def place(self, relative_path: str, where: str) -> Placement:
        match = VAL_FILE.fullmatch(posixpath.basename(relative_path))
        if match is None:
            raise MemberRejected(
                "not an ImageNet validation image name (ILSVRC2012_val_<8 digits>.JPEG)"
            )
        number = int(match.group(1))
        wnid = self.meta.wnid_by_number.get(number)
        if wnid is None:
            raise LayoutError(self.meta.missing(number, where))
        return Placement(None, IMAGENET_CATEGORY, wnid, {"label": self.meta.labels[wnid]})


@dataclass(frozen=True)
class CocoCaptions:
    uri: str
    image_id_by_file: dict[str, int]
    captions: dict[int, list[str]]

    @property
    def uncaptioned(self) -> int:
        return sum(not captions for captions in self.captions.values())


@dataclass(frozen=True)
class CocoLayout:
    annotations: CocoCaptions

    def place(self, relative_path: str, where: str) -> Placement:
        image_id = self.annotations.image_id_by_file.get(posixpath.basename(relative_path))
        if image_id is None:
            raise MemberRejected(f"not listed in the 'images' of {self.annotations.uri}")
        captions = self.annotations.captions[image_id]
        return Placement(None, COCO_CATEGORY, str(image_id), {"captions": captions})


@dataclass(frozen=True)
class PlannedSource:
    """A source as given, what kind it is, and what is read of it."""

    root: str
    kind: str
    read_from: str  # the root itself, or COCO's val2017 folder or zip inside it
    layout: Layout | None  # None for a Hugging Face dataset (its rows are placed by hf_sources)
    columns: frozenset[str] = field(default_factory=frozenset)  # optional image columns
    hf_dataset: HfDataset | None = None  # a Hugging Face dataset folder's rows and columns


def plan_sources(roots: Sequence[str], config: IngestSettings) -> list[PlannedSource]:
    """Recognise each (resolved) source: a Hugging Face dataset folder or COCO by its
    structure, ImageNet by the ``imagenet_meta`` setting, otherwise the PerVA layout."""
    meta = load_imagenet_meta(config.imagenet_meta) if config.imagenet_meta else None
    planned = []
    for root in roots:
        hf = plan_hf_dataset(
            root,
            config.split_dirnames,
            config.signal_columns,
            config.signal_length,
            config.max_image_bytes,
        )
        coco = coco_parts(root) if hf is None else None
        if hf is not None:
            planned.append(PlannedSource(root, HF_KIND, root, None, hf_dataset=hf))
        elif coco is not None:
            images, captions_uri = coco
            layout = CocoLayout(load_coco_captions(captions_uri))
            planned.append(PlannedSource(root, COCO_KIND, images, layout, frozenset({"captions"})))
        elif meta is not None:
            layout = ImageNetLayout(meta)
            planned.append(PlannedSource(root, IMAGENET_KIND, root, layout, frozenset({"label"})))
        else:
            layout = PervaLayout(config.split_dirnames, config.strip_components)
            planned.append(PlannedSource(root, PERVA_KIND, root, layout))
    return planned


def coco_parts(root: str) -> tuple[str, str] | None:
    """(the images folder or zip, the captions file) of a COCO source, None for another
    kind of source; a half COCO folder is an error that says what is missing."""
    if storage.file_type(root) != pafs.FileType.Directory:
        return None
    folder = storage.join(root, COCO_IMAGES)
    archive = storage.join(root, f"{COCO_IMAGES}.zip")
    captions = storage.join(root, COCO_CAPTIONS)
    has_folder = storage.file_type(folder) == pafs.FileType.Directory
    has_archive = storage.file_type(archive) == pafs.FileType.File
    has_captions = storage.file_type(captions) == pafs.FileType.File
    if not (has_folder or has_archive):
        if has_captions:
            raise LayoutError(
                f"{root}: a COCO source (it has {COCO_CAPTIONS}) needs the images in "
                f"{COCO_IMAGES}/ or {COCO_IMAGES}.zip beside annotations/"
            )
        return None
    if not has_captions:
        raise LayoutError(
            f"{root}: a COCO source (it has {COCO_IMAGES}/ or {COCO_IMAGES}.zip) needs "
            f"{COCO_CAPTIONS}"
        )
    if has_folder and has_archive:
        log.info("%s: both %s/ and %s.zip; reading the folder", root, COCO_IMAGES, COCO_IMAGES)
    return (folder if has_folder else archive), captions


def load_coco_captions(uri: str) -> CocoCaptions:
    data = storage.read_json(uri)
    if not isinstance(data, dict):
        raise LayoutError(f"{uri}: not a COCO captions file (expected a JSON object)")
    for key in ("images", "annotations"):
        if not isinstance(data.get(key), list):
            raise LayoutError(f"{uri}: not a COCO captions file (no '{key}' list)")
    image_id_by_file: dict[str, int] = {}
    captions: dict[int, list[str]] = {}
    for index, image in enumerate(data["images"]):
        where = f"{uri}: images[{index}]"
        if not isinstance(image, dict):
            raise LayoutError(f"{where} is not an object")
        image_id, file_name = image.get("id"), image.get("file_name")
        if not isinstance(image_id, int) or isinstance(image_id, bool):
            raise LayoutError(f"{where}: 'id' must be an integer, found {image_id!r}")
        if not isinstance(file_name, str) or not file_name:
            raise LayoutError(f"{where}: 'file_name' must be a file name, found {file_name!r}")
        name = posixpath.basename(file_name)
        if name in image_id_by_file:
            raise LayoutError(f"{where}: file_name {file_name!r} is listed twice")
        if image_id in captions:
            raise LayoutError(f"{where}: id {image_id} is listed twice")
        image_id_by_file[name] = image_id
        captions[image_id] = []
    for index, annotation in enumerate(data["annotations"]):
        where = f"{uri}: annotations[{index}]"
        if not isinstance(annotation, dict):
            raise LayoutError(f"{where} is not an object")
        image_id, caption = annotation.get("image_id"), annotation.get("caption")
        if not isinstance(image_id, int) or isinstance(image_id, bool) or image_id not in captions:
            raise LayoutError(f"{where}: image_id {image_id!r} is not an id in 'images'")
        if not isinstance(caption, str):
            raise LayoutError(f"{where}: 'caption' must be text, found {caption!r}")
        captions[image_id].append(caption.strip())
    return CocoCaptions(uri, image_id_by_file, captions)


def load_imagenet_meta(meta_dir: str) -> ImageNetMeta:
    meta_dir = storage.normalize(meta_dir)
    if storage.file_type(meta_dir) != pafs.FileType.Directory:
        raise LayoutError(
            f"{meta_dir}: imagenet_meta (--imagenet-meta) must be a folder holding "
            f"{SYNSETS_TXT} or {SOLUTION_CSV}, and {LABELS_JSON} or {SYNSET_MAPPING_TXT}"
        )
    ground_truth_uri = _first_present(meta_dir, (SYNSETS_TXT, SOLUTION_CSV), "ground truth")
    labels_uri = _first_present(meta_dir, (LABELS_JSON, SYNSET_MAPPING_TXT), "class names")
    if ground_truth_uri.endswith(SYNSETS_TXT):
        wnid_by_number, line_by_number = _read_synsets_txt(ground_truth_uri)
    else:
        wnid_by_number, line_by_number = _read_solution_csv(ground_truth_uri)
    if labels_uri.endswith(LABELS_JSON):
        labels = _read_labels_json(labels_uri)
    else:
        labels = _read_synset_mapping(labels_uri)
    for number in sorted(wnid_by_number, key=line_by_number.__getitem__):
        wnid = wnid_by_number[number]
        if wnid not in labels:
            raise LayoutError(
                f"{ground_truth_uri}, line {line_by_number[number]}: wnid {wnid} "
                f"is not in {labels_uri}"
            )
    return ImageNetMeta(ground_truth_uri, wnid_by_number, line_by_number, labels_uri, labels)


def write_imagenet_label_files(out_uri: str, meta: ImageNetMeta) -> None:
    """``wnid_to_label.json`` and ``imagenet_class_index.json`` in the dataset's ``.embedpipe/``."""
    storage.write_json(datasets.side_path(out_uri, LABELS_JSON), meta.labels)
    # Numeric key order, as torchvision's and Keras' file (write_json would sort "10" before "2").
    text = json.dumps(meta.class_index(), indent=2, ensure_ascii=False) + "\n"
    storage.write_bytes(datasets.side_path(out_uri, CLASS_INDEX_JSON), text.encode("utf-8"))


def _first_present(meta_dir: str, names: tuple[str, ...], what: str) -> str:
    for name in names:
        uri = storage.join(meta_dir, name)
        if storage.file_type(uri) == pafs.FileType.File:
            return uri
    raise LayoutError(
        f"{meta_dir}: the ImageNet meta folder has no {what} file ({' or '.join(names)})"
    )


def _read_lines(uri: str) -> list[str]:
    try:
        return storage.read_bytes(uri).decode("utf-8-sig").splitlines()
    except UnicodeDecodeError as error:
        raise LayoutError(f"{uri}: not UTF-8 text: {error}") from error


def _read_synsets_txt(uri: str) -> tuple[dict[int, str], dict[int, int]]:
    lines = _read_lines(uri)
    while lines and not lines[-1].strip():
        lines.pop()
    if not lines:
        raise LayoutError(f"{uri}: empty (expected one wnid per line, line N for file N)")
    wnids = {}
    for number, line in enumerate(lines, 1):
        wnid = line.strip()
        if not WNID.fullmatch(wnid):
            raise LayoutError(f"{uri}, line {number}: expected {WNID_EXAMPLE}, found {line!r}")
        wnids[number] = wnid
    return wnids, {number: number for number in wnids}


def _read_solution_csv(uri: str) -> tuple[dict[int, str], dict[int, int]]:
    reader = csv.reader(io.StringIO("\n".join(_read_lines(uri))))
    header = [cell.strip() for cell in next(reader, [])]
    if header[:2] != ["ImageId", "PredictionString"]:
        raise LayoutError(f"{uri}, line 1: expected the header ImageId,PredictionString")
    wnids: dict[int, str] = {}
    lines: dict[int, int] = {}
    for row in reader:
        line = reader.line_num
        if not any(cell.strip() for cell in row):
            continue
        match = VAL_IMAGE_ID.fullmatch(row[0].strip())
        if match is None or len(row) < 2:
            raise LayoutError(
                f"{uri}, line {line}: expected ILSVRC2012_val_<8 digits>,<wnid> <box>..., "
                f"found {','.join(row)!r}"
            )
        tokens = row[1].split()
        if not tokens or not WNID.fullmatch(tokens[0]):
            raise LayoutError(
                f"{uri}, line {line}: PredictionString must start with {WNID_EXAMPLE}, "
                f"found {row[1]!r}"
            )
        number = int(match.group(1))
        if number in wnids:
            raise LayoutError(
                f"{uri}, line {line}: {row[0].strip()} is listed twice (first on line "
                f"{lines[number]})"
            )
        wnids[number], lines[number] = tokens[0], line
    if not wnids:
        raise LayoutError(f"{uri}: no rows below the header")
    return wnids, lines


def _class_name(names: str) -> str:
    """The first of a synset's comma-separated names: 'tench, Tinca tinca' -> 'tench'."""
    return names.split(",", 1)[0].strip()


def _read_labels_json(uri: str) -> dict[str, str]:
    data = storage.read_json(uri)
    if not isinstance(data, dict) or not data:
        raise LayoutError(f"{uri}: expected a JSON object mapping wnids to class names")
    labels = {}
    for wnid, value in data.items():
        if not WNID.fullmatch(wnid):
            raise LayoutError(f"{uri}: key {wnid!r} is not {WNID_EXAMPLE}")
        first = value[0] if isinstance(value, list) and value else value
        name = _class_name(first) if isinstance(first, str) else ""
        if not name:
            raise LayoutError(f"{uri}: the class name of {wnid} must be text, found {value!r}")
        labels[wnid] = name
    return labels


def _read_synset_mapping(uri: str) -> dict[str, str]:
    labels: dict[str, str] = {}
    for number, line in enumerate(_read_lines(uri), 1):
        if not line.strip():
            continue
        parts = line.strip().split(maxsplit=1)
        name = _class_name(parts[1]) if len(parts) == 2 else ""
        if not WNID.fullmatch(parts[0]) or not name:
            raise LayoutError(
                f"{uri}, line {number}: expected '<wnid> <names>' like "
                f"'n01440764 tench, Tinca tinca', found {line!r}"
            )
        if parts[0] in labels:
            raise LayoutError(f"{uri}, line {number}: {parts[0]} is listed twice")
        labels[parts[0]] = name
    if not labels:
        raise LayoutError(f"{uri}: empty (expected lines like 'n01440764 tench, Tinca tinca')")
    return labels
