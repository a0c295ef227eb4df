"""preprocess: ingest -> catalog -> concept splits, and taxonomy when a table is given."""

from typing import NamedTuple

from kfp import dsl
from kfp.dsl import Dataset

from embedpipe import storage
from embedpipe.components import build_components
from embedpipe.config import ConfigError, Settings

PIPELINE_NAME = "embedpipe-preprocess"


def build_pipeline(settings: Settings):
    """The pipeline, with every stage default taken from ``settings`` explicitly."""
    parts = build_components(settings.images.data_image)
    ingest_cfg, catalog_cfg, split_cfg = settings.ingest, settings.catalog, settings.split
    taxonomy_cfg = settings.taxonomy

    class Outputs(NamedTuple):
        images: Dataset
        catalog: Dataset
        splits: Dataset

    @dsl.pipeline(name=PIPELINE_NAME, description="Images -> Parquet shards -> catalog -> splits")
    def preprocess(
        sources: list[str],
        rows_per_shard: int = ingest_cfg.rows_per_shard,
        row_group_rows: int = ingest_cfg.row_group_rows,
        workers: int = ingest_cfg.workers,
        strip_components: int = ingest_cfg.strip_components,
        split_dirnames: list[str] = list(ingest_cfg.split_dirnames),  # noqa: B006
        num_train: int = catalog_cfg.num_train or 0,
        train_fraction: float = catalog_cfg.train_fraction,
        catalog_seed: int = catalog_cfg.seed,
        relative: bool = catalog_cfg.relative,
        concept_frac: float = split_cfg.concept_frac,
        min_concepts_threshold: int = split_cfg.min_concepts_threshold,
        test_sample_frac: float = split_cfg.test_sample_frac,
        max_test_images: int = split_cfg.max_test_images,
        split_seed: int = split_cfg.seed,
        taxonomy_table: str = taxonomy_cfg.table,
        taxonomy_name_column: str = taxonomy_cfg.name_column,
        taxonomy_side_table: str = taxonomy_cfg.side_table,
        taxonomy_side_table_key: str = taxonomy_cfg.side_table_key,
        taxonomy_kingdom: str = taxonomy_cfg.kingdom,
        taxonomy_split_mode: str = taxonomy_cfg.split_mode,
        taxonomy_test_fraction: float = taxonomy_cfg.test_fraction,
        taxonomy_val_fraction: float = taxonomy_cfg.val_fraction,
        taxonomy_min_images_per_species: int = taxonomy_cfg.min_images_per_species,
        taxonomy_keep_genus_in_train: bool = taxonomy_cfg.keep_genus_in_train,
        taxonomy_seed: int = taxonomy_cfg.seed,
    ) -> Outputs:
        ingest_task = parts.ingest(
            sources=sources,
            rows_per_shard=rows_per_shard,
            row_group_rows=row_group_rows,
            workers=workers,
            strip_components=strip_components,
            split_dirnames=split_dirnames,
        )
        # The sources are URIs whose content KFP cannot see: never reuse a cached ingest.
        ingest_task.set_caching_options(False).set_retry(num_retries=2, backoff_duration="30s")
        catalog_task = parts.catalog(
            images=ingest_task.outputs["images"],
            num_train=num_train,
            train_fraction=train_fraction,
            seed=catalog_seed,
            relative=relative,
        )
        split_task = parts.split(
            catalog=catalog_task.outputs["catalog"],
            concept_frac=concept_frac,
            min_concepts_threshold=min_concepts_threshold,
            test_sample_frac=test_sample_frac,
            max_test_images=max_test_images,
            seed=split_seed,
        )
        with dsl.If(taxonomy_table != "", name="taxonomy-table-given"):
            parts.taxonomy(
                images=ingest_task.outputs["images"],
                table=taxonomy_table,
                name_column=taxonomy_name_column,
                side_table=taxonomy_side_table,
                side_table_key=taxonomy_side_table_key,
                kingdom=taxonomy_kingdom,
                split_mode=taxonomy_split_mode,
                test_fraction=taxonomy_test_fraction,
                val_fraction=taxonomy_val_fraction,
                min_images_per_species=taxonomy_min_images_per_species,
                keep_genus_in_train=taxonomy_keep_genus_in_train,
                seed=taxonomy_seed,
            )
        return Outputs(
            images=ingest_task.outputs["images"],
            catalog=catalog_task.outputs["catalog"],
            splits=split_task.outputs["splits"],
        )

    return preprocess


def run_arguments(settings: Settings) -> dict:
    if not settings.paths.sources:
        raise ConfigError("[paths].sources: the preprocess pipeline needs at least one source")
    return {"sources": [storage.normalize(source) for source in settings.paths.sources]}
