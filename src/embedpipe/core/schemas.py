"""Arrow schemas of the data contracts in DESIGN.md (one place, imported by every stage)."""

import pyarrow as pa

IMAGES_KIND = "images"
CATALOG_KIND = "catalog"
SPLITS_KIND = "splits"
TAXONOMY_KIND = "taxonomy"
EMBEDDINGS_KIND = "embeddings"
TEXT_EMBEDDINGS_KIND = "text-embeddings"
DEDUP_KIND = "dedup"
SELECTION_KIND = "selection"
NEGATIVES_KIND = "hard-negatives"
PARTITION_KIND = "category-embeddings"
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
