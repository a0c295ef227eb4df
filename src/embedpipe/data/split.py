"""split: a catalog -> concept-level train/val splits, as the PerVA split script makes them.

In every category with at least ``min_concepts_threshold`` concepts,
``ceil(concept_frac * n)`` concepts are drawn (seeded per category) for
training. A training concept contributes all its train images plus a sample
of its test images: ``floor(test_sample_frac * n_test)``, at least one when
the fraction is positive and there are test images, at most
``max_test_images``; the test images left over are ``unused``. Every other
concept, and every concept of a smaller category, is a validation concept and
keeps its catalog train/test lists unchanged (support and query images).

Outputs: ``splits`` Parquet with one row per catalog image and where it went;
in ``.embedpipe/``, ``train_concepts.json`` and ``val_concepts.json`` in the PerVA
layout, ``split_metadata.json`` recording every selection and sample, and
``split_report.md``.
"""

from __future__ import annotations

import collections
import logging
import math
from dataclasses import dataclass

import pyarrow as pa
import pyarrow.compute as pc

from embedpipe.config import SplitSettings
from embedpipe.core import datasets, outputs, storage
from embedpipe.core.results import StageMetrics
from embedpipe.core.schemas import CATALOG_KIND, SPLITS_KIND, SPLITS_SCHEMA
from embedpipe.core.seeding import rng_for
from embedpipe.data.catalog import perva_layout

log = logging.getLogger(__name__)

TRAIN_JSON = "train_concepts.json"
VAL_JSON = "val_concepts.json"
METADATA_JSON = "split_metadata.json"
REPORT_MD = "split_report.md"


@dataclass(frozen=True)
class SplitResult(StageMetrics):
    out_uri: str
    train_concepts: int
    val_concepts: int
    train_images: int
    val_images: int
    unused_images: int


def test_sample_size(n_test: int, config: SplitSettings) -> int:
    count = math.floor(config.test_sample_frac * n_test)
    if config.test_sample_frac > 0 and count == 0 and n_test > 0:
        count = 1
    return min(count, config.max_test_images)


def select_concepts(category: str, concepts: list[str], config: SplitSettings) -> list[str]:
    if len(concepts) < config.min_concepts_threshold:
        return []
    shuffled = sorted(concepts)
    rng_for(config.seed, category).shuffle(shuffled)
    return sorted(shuffled[: math.ceil(config.concept_frac * len(concepts))])


@outputs.writes_output(inputs=("catalog_uri",))
def create_concept_splits(catalog_uri: str, out_uri: str, config: SplitSettings) -> SplitResult:
    """Split a catalog's concepts into train and val and write the outputs."""
    datasets.verify_dataset(catalog_uri, CATALOG_KIND)
    catalog = datasets.read_table(catalog_uri, CATALOG_KIND)
    columns = {name: catalog.column(name).to_pylist() for name in catalog.schema.names}
    catalog_split, paths = columns["split"], columns["path"]
    concepts_by_category: dict[str, dict[str, list[int]]] = collections.defaultdict(dict)
    for index, (category, concept) in enumerate(
        zip(columns["category"], columns["concept"], strict=True)
    ):
        concepts_by_category[category].setdefault(concept, []).append(index)

    concept_split = [""] * catalog.num_rows
    split = [""] * catalog.num_rows
    metadata: dict = {**config.model_dump(mode="json"), "categories": {}}
    for category in sorted(concepts_by_category):
        concepts = concepts_by_category[category]
        selected = select_concepts(category, list(concepts), config)
        samples: dict = {}
        for concept, indices in concepts.items():
            is_train = concept in selected
            for i in indices:
                concept_split[i] = "train" if is_train else "val"
                split[i] = "unused" if catalog_split[i] == "unused" else concept_split[i]
            if not is_train:
                continue
            tests = [i for i in indices if catalog_split[i] == "test"]
            rng_for(config.seed, category, concept).shuffle(tests)
            sample_size = test_sample_size(len(tests), config)
            for i in tests[sample_size:]:
                split[i] = "unused"
            samples[concept] = {
                "n_original_test": len(tests),
                "n_sampled": sample_size,
                "sampled": [paths[i] for i in tests[:sample_size]],
            }
        metadata["categories"][category] = {
            "n_concepts": len(concepts),
            "below_threshold": len(concepts) < config.min_concepts_threshold,
            "selected_count": len(selected),
            "selected_concepts": selected,
            "sampled_test_images_by_concept": samples,
        }

    table = pa.table(
        {
            **{name: columns[name] for name in ("image_id", "source", "path", "category")},
            "concept": columns["concept"],
            "catalog_split": catalog_split,
            "concept_split": concept_split,
            "split": split,
            "width": columns["width"],
            "height": columns["height"],
        },
        schema=SPLITS_SCHEMA,
    )
    out_uri = storage.normalize(out_uri)
    _write_layouts(out_uri, table, sorted(concepts_by_category))
    storage.write_json(datasets.side_path(out_uri, METADATA_JSON), metadata)
    report = render_report(table, metadata)
    storage.write_bytes(datasets.side_path(out_uri, REPORT_MD), report.encode("utf-8"))
    datasets.save_config(out_uri, "split", config)
    datasets.write_table(out_uri, table, SPLITS_KIND)

    concept_counts = collections.Counter(
        (c, k, s)
        for c, k, s in zip(columns["category"], columns["concept"], concept_split, strict=True)
    )
    image_counts = collections.Counter(split)
    result = SplitResult(
        out_uri=out_uri,
        train_concepts=sum(1 for _, _, s in concept_counts if s == "train"),
        val_concepts=sum(1 for _, _, s in concept_counts if s == "val"),
        train_images=image_counts["train"],
        val_images=image_counts["val"],
        unused_images=image_counts["unused"],
    )
    log.info("concept splits: %s", result.metrics())
    return result


def render_report(table: pa.Table, metadata: dict) -> str:
    """A Markdown table per category: concepts and images on each side of the split."""
    counts = collections.Counter(
        zip(*(table.column(name).to_pylist() for name in ("category", "split")), strict=True)
    )
    lines = [
        f"# Concept splits (seed {metadata['seed']}, concept_frac {metadata['concept_frac']})",
        "",
        "| category | concepts | train concepts | train images | val images | unused |",
        "|---|---:|---:|---:|---:|---:|",
    ]
    for category, info in metadata["categories"].items():
        note = " (below threshold)" if info["below_threshold"] else ""
        lines.append(
            f"| {category}{note} | {info['n_concepts']} | {info['selected_count']} | "
            f"{counts[(category, 'train')]} | {counts[(category, 'val')]} | "
            f"{counts[(category, 'unused')]} |"
        )
    return "\n".join(lines) + "\n"


def _write_layouts(out_uri: str, table: pa.Table, categories: list[str]) -> None:
    """PerVA-layout JSON: train concepts list every training image under "train"."""
    train_rows = table.filter(pc.equal(table.column("split"), "train"))
    val_rows = table.filter(pc.equal(table.column("split"), "val"))
    val_rows = val_rows.drop_columns(["split"]).rename_columns({"catalog_split": "split"})
    for name, rows in ((TRAIN_JSON, train_rows), (VAL_JSON, val_rows)):
        layout = {category: {} for category in categories}
        layout.update(perva_layout(rows))
        storage.write_json(datasets.side_path(out_uri, name), layout)
