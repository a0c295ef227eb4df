"""catalog: ingested images -> a train/test catalog per category and concept.

Two modes, as in the PerVA catalog builder:

- explicit: images came from ``train/`` and ``test/`` folders and keep that
  split; ``num_train`` then caps the train images per concept (the rest are
  marked ``unused``).
- auto: no split folders; each concept's images are shuffled with a seeded
  generator of their own and the first ``num_train`` (exact, overrides) or
  ``max(1, round(train_fraction * n))`` become train, the rest test.

Outputs: the catalog as Parquet (one row per image); in ``.embedpipe/``, the same
catalog as JSON in the PerVA layout
``{category: {concept: {"train": [...], "test": [...]}}}`` and the resolved config.
Same input and seed give byte-identical files.
"""

from __future__ import annotations

import collections
import logging
from dataclasses import dataclass

import pyarrow as pa

from embedpipe.config import CatalogSettings
from embedpipe.core import datasets, outputs, storage
from embedpipe.core.results import StageMetrics
from embedpipe.core.schemas import CATALOG_KIND, CATALOG_SCHEMA, IMAGES_KIND
from embedpipe.core.seeding import rng_for

log = logging.getLogger(__name__)

CATALOG_JSON = "catalog.json"
SOURCE_COLUMNS = ["image_id", "source", "category", "concept", "split", "width", "height"]


class CatalogError(ValueError):
    """The ingested images cannot be made into a catalog."""


@dataclass(frozen=True)
class CatalogResult(StageMetrics):
    out_uri: str
    mode: str
    categories: int
    concepts: int
    train_images: int
    test_images: int
    unused_images: int


def relative_path(source: str, roots: list[str]) -> str:
    """The path of ``source`` below the ingest root it came from."""
    for root in roots:
        for separator in ("::", "/"):
            if source.startswith(root + separator):
                return source[len(root) + len(separator) :]
    raise CatalogError(f"{source}: not below any ingest source ({', '.join(roots)})")


def _assign_explicit(
    indices: list[int], splits: list[str | None], train_name: str, config: CatalogSettings, key
) -> dict[int, str]:
    train = [i for i in indices if splits[i] == train_name]
    assigned = {i: "test" for i in indices if splits[i] != train_name}
    if config.num_train is not None and len(train) > config.num_train:
        rng_for(config.seed, *key).shuffle(train)
        assigned.update({i: "unused" for i in train[config.num_train :]})
        train = train[: config.num_train]
    assigned.update({i: "train" for i in train})
    return assigned


def _assign_auto(indices: list[int], config: CatalogSettings, key) -> dict[int, str]:
    shuffled = list(indices)
    rng_for(config.seed, *key).shuffle(shuffled)
    if config.num_train is not None:
        train_count = min(config.num_train, len(shuffled))
    else:
        train_count = max(1, round(config.train_fraction * len(shuffled)))
    return {i: ("train" if rank < train_count else "test") for rank, i in enumerate(shuffled)}


@outputs.writes_output(inputs=("images_uri",))
def build_catalog(images_uri: str, out_uri: str, config: CatalogSettings) -> CatalogResult:
    """Assign every ingested image to train or test and write the catalog."""
    manifest = datasets.verify_dataset(images_uri, IMAGES_KIND)
    table = datasets.read_table(images_uri, IMAGES_KIND, columns=SOURCE_COLUMNS)
    columns = {name: table.column(name).to_pylist() for name in SOURCE_COLUMNS}
    sources, splits = columns["source"], columns["split"]
    with_split = sum(split is not None for split in splits)
    if 0 < with_split < len(splits):
        example_with = next(
            s for s, split in zip(sources, splits, strict=True) if split is not None
        )
        example_without = next(s for s, split in zip(sources, splits, strict=True) if split is None)
        raise CatalogError(
            f"{images_uri}: mixed layouts: {with_split} images sit in split folders "
            f"(e.g. {example_with}) and {len(splits) - with_split} do not "
            f"(e.g. {example_without}); ingest them as separate datasets"
        )
    mode = "explicit" if with_split else "auto"
    train_name = manifest.get("split_dirnames", ["train"])[0]

    groups: dict[tuple[str, str], list[int]] = collections.defaultdict(list)
    for index, key in enumerate(zip(columns["category"], columns["concept"], strict=True)):
        groups[key].append(index)
    assigned: dict[int, str] = {}
    for key, indices in groups.items():
        indices.sort(key=lambda i: sources[i])
        if mode == "explicit":
            assigned.update(_assign_explicit(indices, splits, train_name, config, key))
        else:
            assigned.update(_assign_auto(indices, config, key))

    roots = manifest["sources"]
    paths = [relative_path(s, roots) for s in sources] if config.relative else list(sources)
    order = sorted(
        range(len(sources)),
        key=lambda i: (columns["category"][i], columns["concept"][i], sources[i], i),
    )
    catalog = pa.table(
        {
            "image_id": [columns["image_id"][i] for i in order],
            "source": [sources[i] for i in order],
            "path": [paths[i] for i in order],
            "category": [columns["category"][i] for i in order],
            "concept": [columns["concept"][i] for i in order],
            "split": [assigned[i] for i in order],
            "width": [columns["width"][i] for i in order],
            "height": [columns["height"][i] for i in order],
        },
        schema=CATALOG_SCHEMA,
    )
    out_uri = storage.normalize(out_uri)
    storage.write_json(datasets.side_path(out_uri, CATALOG_JSON), perva_layout(catalog))
    datasets.save_config(out_uri, "catalog", config)
    datasets.write_table(out_uri, catalog, CATALOG_KIND, extra={"mode": mode})
    counts = collections.Counter(catalog.column("split").to_pylist())
    result = CatalogResult(
        out_uri=out_uri,
        mode=mode,
        categories=len({category for category, _ in groups}),
        concepts=len(groups),
        train_images=counts["train"],
        test_images=counts["test"],
        unused_images=counts["unused"],
    )
    log.info("catalog (%s split): %s", mode, result.metrics())
    return result


def perva_layout(catalog: pa.Table, splits: tuple[str, ...] = ("train", "test")) -> dict:
    """``{category: {concept: {"train": [paths], "test": [paths]}}}`` from catalog rows."""
    layout: dict = {}
    rows = zip(
        *(catalog.column(name).to_pylist() for name in ("category", "concept", "split")),
        strict=True,
    )
    for path, (category, concept, split) in zip(
        catalog.column("path").to_pylist(), rows, strict=True
    ):
        entry = layout.setdefault(category, {}).setdefault(concept, {s: [] for s in splits})
        if split in entry:
            entry[split].append(path)
    return layout
