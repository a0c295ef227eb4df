"""Arrow schemas of the data contracts in DESIGN.md (one place, imported by every stage)."""

from collections.abc import Sequence

import pyarrow as pa

IMAGES_KIND = "images"
CATALOG_KIND = "catalog"
SPLITS_KIND = "splits"
TAXONOMY_KIND = "taxonomy"
EMBEDDINGS_KIND = "embeddings"
TEXT_EMBEDDINGS_KIND = "text-embeddings"
SIGNAL_EMBEDDINGS_KIND = "signal-embeddings"  # embeddings of an images dataset's signal column
DEDUP_KIND = "dedup"
SELECTION_KIND = "selection"
NEGATIVES_KIND = "hard-negatives"
PARTITION_KIND = "category-embeddings"
EVALUATION_KIND = "evaluation"
TAXONOMY_SPECIES_KIND = "taxonomy-species"
TAXONOMY_TREE_KIND = "taxonomy-tree"
TAXONOMY_RANK_KEYS_KIND = "taxonomy-rank-keys"
TAXONOMY_INDEX_KIND = "taxonomy-index"

TAXONOMY_RANKS = ("kingdom", "phylum", "class", "order", "family", "genus", "species")
PARTITIONS_KIND = "category-partitions"  # the folder of every category's partition

IMAGES_SCHEMA = pa.schema(
    [
        pa.field("image_id", pa.string(), nullable=False),  # sha256 of the encoded bytes
        pa.field("image", pa.binary(), nullable=False),  # the original encoded bytes
        pa.field("source", pa.string(), nullable=False),
        pa.field("category", pa.string(), nullable=False),
        pa.field("concept", pa.string(), nullable=False),
        pa.field("split", pa.string()),  # from an explicit train/test folder, else null
        pa.field("width", pa.int32(), nullable=False),
        pa.field("height", pa.int32(), nullable=False),
    ]
)

# Columns an images dataset has only when a source provides them, after the fixed ones;
# stages read the fixed columns by name, so they accept datasets with or without these.
IMAGES_OPTIONAL_FIELDS = (
    pa.field("label", pa.string()),  # ImageNet: the class name of the concept (a wnid)
    pa.field("captions", pa.list_(pa.string())),  # COCO: every caption of the image
)


def images_schema(
    optional_columns: set[str] | frozenset[str] = frozenset(),
    signal_fields: Sequence[pa.Field] = (),
) -> pa.Schema:
    """IMAGES_SCHEMA followed by the named optional columns, in a fixed order, then the
    signal (``list<float32>``) and scalar target (``float64``) columns, in table order."""
    known = {field.name for field in IMAGES_OPTIONAL_FIELDS}
    unknown = set(optional_columns) - known
    if unknown:
        raise ValueError(f"unknown optional image column(s): {', '.join(sorted(unknown))}")
    extra = [field for field in IMAGES_OPTIONAL_FIELDS if field.name in optional_columns]
    return pa.schema([*IMAGES_SCHEMA, *extra, *signal_fields])


REJECTED_SCHEMA = pa.schema(
    [
        pa.field("source", pa.string(), nullable=False),
        pa.field("reason", pa.string(), nullable=False),
    ]
)

CATALOG_SCHEMA = pa.schema(
    [
        pa.field("image_id", pa.string(), nullable=False),
        pa.field("source", pa.string(), nullable=False),
        pa.field("path", pa.string(), nullable=False),  # as written in the PerVA JSON
        pa.field("category", pa.string(), nullable=False),
        pa.field("concept", pa.string(), nullable=False),
        pa.field("split", pa.string(), nullable=False),  # train | test | unused
        pa.field("width", pa.int32(), nullable=False),
        pa.field("height", pa.int32(), nullable=False),
    ]
)

SPLITS_SCHEMA = pa.schema(
    [
        *[CATALOG_SCHEMA.field(name) for name in ("image_id", "source", "path")],
        *[CATALOG_SCHEMA.field(name) for name in ("category", "concept")],
        pa.field("catalog_split", pa.string(), nullable=False),  # train | test | unused
        pa.field("concept_split", pa.string(), nullable=False),  # train | val
        pa.field("split", pa.string(), nullable=False),  # train | val | unused
        *[CATALOG_SCHEMA.field(name) for name in ("width", "height")],
    ]
)

NEGATIVES_SCHEMA = pa.schema(
    [
        pa.field("query_id", pa.string(), nullable=False),
        pa.field("category", pa.string(), nullable=False),
        pa.field("concept", pa.string(), nullable=False),
        pa.field("positive_ids", pa.list_(pa.string()), nullable=False),
        pa.field("negative_ids", pa.list_(pa.string()), nullable=False),
        pa.field("negative_scores", pa.list_(pa.float32()), nullable=False),
        pa.field("band", pa.list_(pa.string()), nullable=False),
    ]
)

DEDUP_GROUPS_SCHEMA = pa.schema(
    [
        ("group_id", pa.int32()),
        ("image_id", pa.string()),
        ("source", pa.string()),
        ("category", pa.string()),
        ("concept", pa.string()),
        ("split", pa.string()),
        ("representative", pa.bool_()),
        ("exact", pa.bool_()),
        ("distance", pa.int32()),
        ("leaks", pa.bool_()),
    ]
)

TAXONOMY_SPECIES_SCHEMA = pa.schema(
    [
        ("raw_name", pa.string()),
        ("name", pa.string()),
        ("infraspecific", pa.string()),
        ("status", pa.string()),
        ("reason", pa.string()),
        ("taxon_id", pa.string()),
        ("accepted_name", pa.string()),
        ("matched_status", pa.string()),
        ("images", pa.int64()),
    ]
)

TAXONOMY_TREE_SCHEMA = pa.schema(
    [
        ("taxon_id", pa.string()),
        *[(rank, pa.string()) for rank in TAXONOMY_RANKS],
        ("vernacular_name", pa.string()),
        ("images", pa.int64()),
    ]
)

TAXONOMY_RANK_KEYS_SCHEMA = pa.schema(
    [
        ("rank", pa.string()),
        ("lineage", pa.string()),
        ("name", pa.string()),
        ("key", pa.int32()),
    ]
)

TAXONOMY_INDEX_SCHEMA = pa.schema(
    [
        ("image_id", pa.string()),
        ("source", pa.string()),
        ("species_id", pa.string()),
        *[(f"{rank}_key", pa.int32()) for rank in TAXONOMY_RANKS],
        ("taxonomic_name", pa.string()),
        ("common_name", pa.string()),
        ("caption", pa.string()),
    ]
)
