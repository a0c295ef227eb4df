"""The ground truth of an evaluation, read from the metadata: labels and class names,
captions, categories and concepts, splits, numeric columns. Each task asks for what it
needs and gets either its inputs or the reason the data cannot serve it."""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from embedpipe.config.evaluate import EvaluateSettings
from embedpipe.core import datasets, storage
from embedpipe.evaluate.sources import MissingGroundTruth
from embedpipe.evaluate.templates import TEMPLATE_SETS


def read_metadata(uri: str) -> tuple[pa.Table, str]:
    """One row per distinct image id (the first), without image bytes; and its kind."""
    manifest = datasets.read_manifest(uri)
    fs, path = storage.arrow_filesystem(datasets.shard_uris(uri, manifest)[0])
    columns = [name for name in pq.read_schema(path, filesystem=fs).names if name != "image"]
    if "image_id" not in columns:
        raise MissingGroundTruth(f"{uri}: no image_id column ({', '.join(columns)})")
    table = datasets.read_table(uri, columns=columns)
    ids = table.column("image_id").to_numpy(zero_copy_only=False)
    _, first_rows = np.unique(ids, return_index=True)
    return table.take(np.sort(first_rows)), manifest.get("kind", "")


@dataclass
class Labels:
    class_names: list[str]
    targets: np.ndarray  # class index per row, -1 where the row has no label
    column: str


@dataclass
class Captions:
    texts: list[str]
    pair_text: np.ndarray  # pair j: text pair_text[j] describes row pair_row[j]
    pair_row: np.ndarray
    column: str


@dataclass
class Truth:
    table: pa.Table
    config: EvaluateSettings
    _labels: Labels | None = field(default=None, init=False)

    @property
    def ids(self) -> list[str]:
        return self.table.column("image_id").to_pylist()

    def has(self, column: str) -> bool:
        return column in self.table.column_names

    def strings(self, column: str) -> np.ndarray:
        return np.asarray(self.table.column(column).to_pylist(), dtype=object)

    def need(self, task: str, *columns: str) -> None:
        missing = [c for c in columns if not self.has(c)]
        if missing:
            raise MissingGroundTruth(
                f"{task}: the metadata has no '{missing[0]}' column "
                f"(columns: {', '.join(self.table.column_names)})"
            )

    def in_split(self, split: str) -> np.ndarray:
        if not split:
            return np.ones(self.table.num_rows, dtype=bool)
        self.need(f"split '{split}'", "split")
        return self.strings("split") == split

    def label_column(self) -> str:
        column = self.config.label_column
        if column == "auto":
            column = "label" if self.has("label") else "concept"
        return column

    def labels(self) -> Labels:
        """Class names from the labels (mapped), in the configured order or sorted; an
        error when the configured class names miss labels the data holds."""
        if self._labels is not None:
            return self._labels
        column = self.label_column()
        self.need("zero-shot classification", column)
        mapping = {}
        if self.config.class_map_file:
            mapping = storage.read_json(self.config.class_map_file)
            if not isinstance(mapping, dict):
                raise ValueError(f"{self.config.class_map_file}: expected a JSON object")
        raw = self.strings(column)
        names = np.asarray([None if v is None else str(mapping.get(v, v)) for v in raw], object)
        present = sorted({n for n in names if n is not None})
        if not present:
            raise MissingGroundTruth(f"zero-shot classification: column '{column}' is empty")
        class_names = list(self.config.class_names) or present
        index = {name: k for k, name in enumerate(class_names)}
        unmatched = [n for n in present if n not in index]
        if unmatched:
            hint = "; give class_map_file" if not mapping else ""
            raise MissingGroundTruth(
                f"class names do not match the data's labels: {len(unmatched)} of the "
                f"{len(present)} labels of column '{column}' have no class name "
                f"(e.g. {unmatched[0]!r}){hint}"
            )
        targets = np.asarray([-1 if n is None else index[n] for n in names], dtype=np.int64)
        self._labels = Labels(class_names, targets, column)
        return self._labels

    def templates(self) -> tuple[str, ...]:
        return self.config.templates or TEMPLATE_SETS[self.config.template_set]

    def captions(self, rows: np.ndarray) -> Captions:
        """Distinct caption texts of the given rows, and which rows each describes."""
        column = self.config.caption_column
        if column == "auto":
            column = next((c for c in ("captions", "caption") if self.has(c)), "")
            if not column:
                raise MissingGroundTruth(
                    "image-text retrieval: the metadata has no captions or caption column "
                    "(set caption_column to a column of texts, or to 'prompt')"
                )
        if column == "prompt":
            labels = self.labels()
            template = self.templates()[0]
            per_row = [
                [template.format(c=labels.class_names[t])] if t >= 0 else [] for t in labels.targets
            ]
        else:
            self.need("image-text retrieval", column)
            values = self.table.column(column).to_pylist()
            per_row = [v if isinstance(v, list) else ([] if v is None else [v]) for v in values]
        index: dict[str, int] = {}
        pair_text, pair_row = [], []
        for row in np.flatnonzero(rows).tolist():
            for text in dict.fromkeys(t for t in per_row[row] if t):
                pair_text.append(index.setdefault(text, len(index)))
                pair_row.append(row)
        if not pair_text:
            raise MissingGroundTruth(f"image-text retrieval: column '{column}' holds no text")
        return Captions(
            list(index), np.asarray(pair_text, np.int64), np.asarray(pair_row, np.int64), column
        )

    def numeric(self, column: str) -> np.ndarray:
        self.need("regression probe", column)
        array = self.table.column(column)
        if not (pa.types.is_integer(array.type) or pa.types.is_floating(array.type)):
            raise MissingGroundTruth(
                f"regression probe: column '{column}' is {array.type}, not numeric"
            )
        return pc.cast(array, pa.float64()).to_numpy(zero_copy_only=False)
