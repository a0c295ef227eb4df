"""preprocess: ingest -> catalog -> splits -> dedup -> embed, and taxonomy when a table is given."""

from typing import NamedTuple

from kfp import dsl
from kfp.dsl import Dataset

from embedpipe.components import build_components
from embedpipe.config import ConfigError, Settings
from embedpipe.core import storage
from embedpipe.models.registry import get_entry
from embedpipe.pipelines.cluster import place

PIPELINE_NAME = "embedpipe-preprocess"


def build_pipeline(settings: Settings):
    """The pipeline, with every stage default taken from ``settings`` explicitly."""
    parts = build_components(settings.images.data_image, settings.images.gpu_image)
    ingest_cfg, catalog_cfg, split_cfg = settings.ingest, settings.catalog, settings.split
    taxonomy_cfg, dedup_cfg, embed_cfg = settings.taxonomy, settings.dedup, settings.embed
    model_spec = get_entry(embed_cfg.model, settings.models).model_dump_json()
    cluster = settings.cluster

    class Outputs(NamedTuple):
        images: Dataset
        catalog: Dataset
        splits: Dataset
        embeddings: Dataset

    @dsl.pipeline(
        name=PIPELINE_NAME,
        description="Images -> Parquet shards -> catalog -> splits -> dedup -> embeddings",
        pipeline_root=cluster.pipeline_root or None,
    )
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
        dedup_hash: str = dedup_cfg.hash,
        dedup_hash_size: int = dedup_cfg.hash_size,
        dedup_max_distance: int = dedup_cfg.max_distance,
        dedup_workers: int = dedup_cfg.workers,
        dedup_drop: str = dedup_cfg.drop,
        dedup_report_groups: int = dedup_cfg.report_groups,
        embed_model_spec: str = model_spec,
        embed_weights: str = embed_cfg.weights,
        embed_tokenizer_dir: str = embed_cfg.tokenizer_dir,
        embed_batch_size: int = embed_cfg.batch_size,
        embed_num_workers: int = embed_cfg.num_workers,
        embed_device: str = embed_cfg.device,
        embed_precision: str = embed_cfg.precision,
        embed_normalize: bool = embed_cfg.normalize,
        embed_draft_decode: bool = embed_cfg.draft_decode,
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
        # Every later step is a function of its input artifacts and parameters: cached.
        place(ingest_task, cluster, cache=False)
        catalog_task = parts.catalog(
            images=ingest_task.outputs["images"],
            num_train=num_train,
            train_fraction=train_fraction,
            seed=catalog_seed,
            relative=relative,
        )
        place(catalog_task, cluster, cache=True)
        split_task = parts.split(
            catalog=catalog_task.outputs["catalog"],
            concept_frac=concept_frac,
            min_concepts_threshold=min_concepts_threshold,
            test_sample_frac=test_sample_frac,
            max_test_images=max_test_images,
            seed=split_seed,
        )
        place(split_task, cluster, cache=True)
        dedup_task = parts.dedup(
            images=ingest_task.outputs["images"],
            splits=split_task.outputs["splits"],
            hash=dedup_hash,
            hash_size=dedup_hash_size,
            max_distance=dedup_max_distance,
            workers=dedup_workers,
            drop=dedup_drop,
            report_groups=dedup_report_groups,
        )
        place(dedup_task, cluster, cache=True)
        embed_task = parts.embed(
            images=ingest_task.outputs["images"],
            select=dedup_task.outputs["kept"],
            model_spec=embed_model_spec,
            weights=embed_weights,
            tokenizer_dir=embed_tokenizer_dir,
            batch_size=embed_batch_size,
            num_workers=embed_num_workers,
            device=embed_device,
            precision=embed_precision,
            normalize=embed_normalize,
            draft_decode=embed_draft_decode,
        )
        place(
            embed_task,
            cluster,
            cache=True,
            accelerator_type=embed_cfg.accelerator_type,
            accelerator_limit=embed_cfg.accelerator_limit,
        )
        with dsl.If(taxonomy_table != "", name="taxonomy-table-given"):
            taxonomy_task = parts.taxonomy(
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
            place(taxonomy_task, cluster, cache=True)
        return Outputs(
            images=ingest_task.outputs["images"],
            catalog=catalog_task.outputs["catalog"],
            splits=split_task.outputs["splits"],
            embeddings=embed_task.outputs["embeddings"],
        )

    return preprocess


def run_arguments(settings: Settings) -> dict:
    if not settings.paths.sources:
        raise ConfigError("[paths].sources: the preprocess pipeline needs at least one source")
    return {"sources": [storage.normalize(source) for source in settings.paths.sources]}
