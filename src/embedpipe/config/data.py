"""Settings of the data stages: ingest, catalog, split, dedup."""

from __future__ import annotations

from typing import Literal

from pydantic import Field, field_validator

from embedpipe.config.base import Section


class IngestSettings(Section):
    rows_per_shard: int = Field(5000, gt=0, description="images per Parquet shard")
    row_group_rows: int = Field(256, gt=0, description="images per Parquet row group")
    workers: int = Field(0, ge=0, description="decoding processes; 0 = one per CPU core")
    strip_components: int = Field(
        0, ge=0, description="leading path components to drop (like tar --strip-components)"
    )
    split_dirnames: tuple[str, ...] = Field(
        ("train", "test"), description="top-level folder names that mean an explicit split"
    )
    max_pixels: int = Field(
        89_478_485,
        gt=0,
        description="larger images (width x height, read from the header before decoding) "
        "are rejected; the default is Pillow's decompression-bomb threshold",
    )
    max_aspect_ratio: float = Field(
        25.0,
        ge=1.0,
        description="images whose long side exceeds this many times the short side are "
        "rejected (a shorter-side resize would blow them up to gigabytes)",
    )
    max_image_bytes: int = Field(
        256 * 1024 * 1024,
        gt=0,
        description="larger files and tar members are rejected unread (size from the "
        "listing or the tar header)",
    )

    imagenet_meta: str = Field(
        "",
        description="folder with the ImageNet validation ground truth "
        "(ILSVRC2012_val_synsets.txt or LOC_val_solution.csv) and class names "
        "(wnid_to_label.json or LOC_synset_mapping.txt); when set, sources are read as "
        "ImageNet validation images (ILSVRC2012_img_val.tar or a folder of "
        "ILSVRC2012_val_*.JPEG) with concept = wnid and a label column",
    )

    signals: str = Field(
        "",
        description="Parquet or CSV table (path or s3:// URI) of signals (float arrays) and "
        "scalar targets joined per image on signal_key; its columns are added to the images "
        "dataset (list<float32> and float64); in CSV a signal cell is a JSON array of numbers; "
        "empty = no table",
    )
    signal_key: Literal["image_id", "source"] = Field(
        "image_id",
        description="key column of the signals table: image_id (the sha256 of the image "
        "bytes), or source (the image's path relative to the source folder or archive, "
        "or its full path or URI)",
    )
    signal_columns: tuple[str, ...] = Field(
        (),
        description="columns taken as signals and scalar targets from the signals table and "
        "Hugging Face dataset sources; empty = every column but the key, the image, "
        "category and concept columns and those named like images dataset columns "
        "(source, label, ...)",
    )
    signal_length: int = Field(
        0,
        ge=0,
        description="values every signal must have (images with another length are "
        "rejected); 0 = fixed only where the table declares it (Parquet/Arrow "
        "fixed_size_list, datasets Sequence(length=N) or Array2D((N, 1)))",
    )

    @field_validator("split_dirnames")
    @classmethod
    def _distinct(cls, value: tuple[str, ...]) -> tuple[str, ...]:
        if not value or len(set(value)) != len(value):
            raise ValueError("must be a non-empty list of distinct folder names")
        return value


class CatalogSettings(Section):
    num_train: int | None = Field(
        None, ge=1, description="exact train images per concept; overrides train_fraction"
    )
    train_fraction: float = Field(
        0.2, gt=0.0, le=1.0, description="share of each concept's images put in train"
    )
    seed: int = Field(42, description="seed of the per-concept shuffles")
    relative: bool = Field(False, description="JSON paths relative to the source root")


class SplitSettings(Section):
    concept_frac: float = Field(
        0.65, ge=0.0, le=1.0, description="share of each category's concepts used for training"
    )
    min_concepts_threshold: int = Field(
        3, ge=1, description="split only categories with at least this many concepts"
    )
    test_sample_frac: float = Field(
        1.0,
        ge=0.0,
        le=1.0,
        description="share of a training concept's test images moved into training",
    )
    max_test_images: int = Field(200, ge=0, description="cap on the test images moved per concept")
    seed: int = Field(23, description="seed of the concept selection")


class DedupSettings(Section):
    hash: Literal["phash", "dhash", "whash", "colorhash"] = Field(
        "phash", description="perceptual hash (imagehash)"
    )
    hash_size: int = Field(8, ge=4, le=32, description="hash side: a hash has size^2 bits")
    max_distance: int = Field(6, ge=0, description="Hamming bits that still make a near duplicate")
    workers: int = Field(0, ge=0, description="hashing processes; 0 = one per core")
    drop: Literal["none", "duplicates", "leaking"] = Field(
        "none",
        description="kept selection: none (all), duplicates (one per group), "
        "leaking (drop only groups spanning splits)",
    )
    report_groups: int = Field(24, ge=0, description="largest groups shown in the HTML report")
