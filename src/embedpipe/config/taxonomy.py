"""Settings of the taxonomy stage."""

from __future__ import annotations

from typing import Literal

from pydantic import Field, model_validator

from embedpipe.config.base import COMPILE_TIME_FLAG, Section


class TaxonomySettings(Section):
    table: str = Field(
        "",
        description="GBIF/Darwin Core taxon TSV (path or s3://); the preprocess pipeline "
        "runs taxonomy only when it is set",
        json_schema_extra=COMPILE_TIME_FLAG,
    )
    name_column: str = Field("concept", description="column holding the species name")
    side_table: str = Field("", description="Parquet/CSV with the name column, joined per image")
    side_table_key: Literal["image_id", "source"] = Field(
        "image_id", description="join key of the side table"
    )
    kingdom: str = Field("", description="resolve names in this kingdom only (homonyms)")
    split_mode: Literal["species", "images"] = Field(
        "species", description="species: hold out whole species; images: split within species"
    )
    test_fraction: float = Field(0.2, ge=0.0, lt=1.0, description="held-out share")
    val_fraction: float = Field(0.0, ge=0.0, lt=1.0, description="validation share")
    min_images_per_species: int = Field(
        1, ge=1, description="species with fewer images are left out"
    )
    keep_genus_in_train: bool = Field(
        True, description="a genus never loses all its species to held-out splits"
    )
    seed: int = Field(42, description="seed of the taxon split")

    @model_validator(mode="after")
    def _fractions_leave_train(self) -> TaxonomySettings:
        if self.test_fraction + self.val_fraction >= 1.0:
            raise ValueError("test_fraction + val_fraction must be below 1")
        return self
