"""Training examples read from our artifacts, and images decoded in DataLoader workers.

Rows are the distinct images of the images dataset, narrowed to a selection (the
split's rows, or dedup's kept rows) when one is given; a ``split`` column there
(train / val / unused) says which rows train and which validate. Captions come
from a taxonomy index where it has one, else from the templates; labels for
``multipos_sigmoid`` are the concept or a taxonomy rank's key.
"""

from __future__ import annotations

import collections
from dataclasses import dataclass, field

import numpy as np
import pyarrow.parquet as pq
import torch
from torch.utils.data import Dataset

from embedpipe.config import ConfigError, TrainSettings
from embedpipe.core import datasets, storage
from embedpipe.core.images import DEFAULT_LIMITS, ImageRejected, decode_rgb
from embedpipe.core.schemas import IMAGES_KIND
from embedpipe.core.seeding import derived_seed


@dataclass
class Examples:
    """One row per distinct image, in images-dataset order."""

    image_ids: list[str]
    categories: list[str]
    concepts: list[str]
    split: np.ndarray  # train | val | unused
    labels: np.ndarray  # int64 label per row (concept or taxonomy rank key)
    captions: list[str | None]  # the taxonomy caption, where there is one
    index: dict[str, int] = field(default_factory=dict)

    def __post_init__(self) -> None:
        self.index = {image_id: row for row, image_id in enumerate(self.image_ids)}

    def rows(self, split: str) -> np.ndarray:
        return np.flatnonzero(self.split == split)

    def concept_keys(self) -> list[tuple[str, str]]:
        return list(zip(self.categories, self.concepts, strict=True))


def load_examples(
    images_uri: str,
    config: TrainSettings,
    splits_uri: str | None = None,
    captions_uri: str | None = None,
) -> Examples:
    meta = datasets.read_table(images_uri, IMAGES_KIND, ["image_id", "category", "concept"])
    ids, categories, concepts = (meta.column(n).to_pylist() for n in meta.column_names)
    first = dict.fromkeys(ids)
    rows = {image_id: i for i, image_id in reversed(list(enumerate(ids)))}
    order = [rows[image_id] for image_id in first]
    ids = [ids[i] for i in order]
    categories = [categories[i] for i in order]
    concepts = [concepts[i] for i in order]
    split = np.full(len(ids), "train", dtype=object)
    if splits_uri:
        selection = datasets.read_table(splits_uri)
        names = selection.column_names
        if "image_id" not in names:
            raise ConfigError(f"{splits_uri}: a selection needs an image_id column")
        chosen = dict(
            zip(
                selection.column("image_id").to_pylist(),
                selection.column("split").to_pylist()
                if "split" in names
                else ["train"] * selection.num_rows,
                strict=True,
            )
        )
        keep = [i for i, image_id in enumerate(ids) if image_id in chosen]
        ids = [ids[i] for i in keep]
        categories = [categories[i] for i in keep]
        concepts = [concepts[i] for i in keep]
        split = np.array([chosen[image_id] or "train" for image_id in ids], dtype=object)
    captions: list[str | None] = [None] * len(ids)
    taxonomy: dict[str, dict] = {}
    if captions_uri:
        index = datasets.read_table(captions_uri)
        if "image_id" not in index.column_names:
            raise ConfigError(
                f"--captions {captions_uri}: has no image_id column (a {index.num_rows}-row "
                "table of " + ", ".join(index.column_names[:4]) + "); give the taxonomy index"
            )
        for record in index.to_pylist():
            taxonomy.setdefault(record["image_id"], record)
        captions = [taxonomy.get(image_id, {}).get("caption") for image_id in ids]
    if config.labels == "concept":
        keys = {key: n for n, key in enumerate(sorted(set(zip(categories, concepts, strict=True))))}
        labels = np.array([keys[key] for key in zip(categories, concepts, strict=True)])
    else:
        column = f"{config.labels}_key"
        if not captions_uri:
            raise ConfigError(
                f"labels: {config.labels} labels come from a taxonomy index; give --captions"
            )
        values = [taxonomy.get(image_id, {}).get(column) for image_id in ids]
        missing = sum(v is None for v, s in zip(values, split, strict=True) if s == "train")
        if missing:
            raise ConfigError(
                f"labels: {missing} training image(s) have no {column} in {captions_uri}"
            )
        labels = np.array([-1 if v is None else int(v) for v in values])
    examples = Examples(ids, categories, concepts, split, labels.astype(np.int64), captions)
    if not len(examples.rows("train")):
        where = splits_uri or images_uri
        raise ConfigError(f"{where}: the training split is empty (no rows with split 'train')")
    return examples


def caption_for(examples: Examples, row: int, templates: tuple[str, ...], seed: int) -> str:
    caption = examples.captions[row]
    if caption:
        return caption
    template = templates[derived_seed(seed, "template", examples.image_ids[row]) % len(templates)]
    concept = examples.concepts[row].replace("_", " ")
    return template.format(concept=concept, category=examples.categories[row])


def positive_for(examples: Examples, row: int, same_concept: dict, seed: int, epoch: int) -> int:
    """Another training image of the row's concept, drawn from (seed, epoch, row)."""
    others = same_concept[(examples.categories[row], examples.concepts[row])]
    choices = [other for other in others if other != row] or [row]
    return choices[derived_seed(seed, "positive", str(epoch), str(row)) % len(choices)]


def rows_by_concept(examples: Examples, rows: np.ndarray) -> dict[tuple[str, str], list[int]]:
    grouped: dict[tuple[str, str], list[int]] = collections.defaultdict(list)
    for row in rows.tolist():
        grouped[(examples.categories[row], examples.concepts[row])].append(row)
    return grouped


class ImageStore:
    """Encoded images by id: where each lives (shard, row group, row), read on demand.

    Picklable; each DataLoader worker keeps its own small cache of row groups."""

    CACHED_GROUPS = 8

    def __init__(self, images_uri: str, wanted: set[str]):
        self.uri = images_uri
        manifest = datasets.read_manifest(images_uri, IMAGES_KIND)
        self.shards = datasets.shard_uris(images_uri, manifest)
        self.where: dict[str, tuple[int, int, int]] = {}
        for shard, uri in enumerate(self.shards):
            fs, path = storage.arrow_filesystem(uri)
            with fs.open_input_file(path) as handle:
                parquet = pq.ParquetFile(handle)
                for group in range(parquet.num_row_groups):
                    column = parquet.read_row_group(group, columns=["image_id"]).column(0)
                    for row, image_id in enumerate(column.to_pylist()):
                        if image_id in wanted and image_id not in self.where:
                            self.where[image_id] = (shard, group, row)
        self._cache: collections.OrderedDict = collections.OrderedDict()

    def __getstate__(self) -> dict:
        return {**self.__dict__, "_cache": collections.OrderedDict()}

    def read(self, image_id: str) -> bytes:
        shard, group, row = self.where[image_id]
        key = (shard, group)
        if key not in self._cache:
            fs, path = storage.arrow_filesystem(self.shards[shard])
            with fs.open_input_file(path) as handle:
                column = pq.ParquetFile(handle).read_row_group(group, columns=["image"])
            self._cache[key] = column.column(0)
            if len(self._cache) > self.CACHED_GROUPS:
                self._cache.popitem(last=False)
        self._cache.move_to_end(key)
        return self._cache[key][row].as_py()


class UndecodableImage(ValueError):
    """A training image that does not decode, named by its id."""

    @classmethod
    def from_loader(cls, error: UndecodableImage) -> UndecodableImage:
        """The one line again: a DataLoader worker's error arrives wrapped in its traceback,
        whose last line is ``module.UndecodableImage: MESSAGE``."""
        last = str(error).strip().splitlines()[-1]
        return cls(last.split("UndecodableImage: ", 1)[-1])


class PixelDataset(Dataset):
    """Item ``row`` -> (row, pixels): decoded and transformed in the loader's worker."""

    def __init__(self, store: ImageStore, image_ids: list[str], transform):
        self.store = store
        self.image_ids = image_ids
        self.transform = transform

    def __len__(self) -> int:
        return len(self.image_ids)

    def _pixels(self, row: int) -> torch.Tensor:
        image_id = self.image_ids[row]
        try:
            image = decode_rgb(self.store.read(image_id), DEFAULT_LIMITS)
        except ImageRejected as error:
            raise UndecodableImage(
                f"{self.store.uri}: image {image_id} cannot be decoded ({error}); train on a "
                "selection without it (--splits), or ingest it again"
            ) from None
        return self.transform(image)

    def __getitem__(self, row: int) -> tuple[int, torch.Tensor]:
        return row, self._pixels(row)


def collate_rows(items: list[tuple[int, torch.Tensor]]) -> tuple[torch.Tensor, torch.Tensor]:
    rows = torch.tensor([row for row, _ in items], dtype=torch.int64)
    return rows, torch.stack([pixels for _, pixels in items])
