"""preprocess: ingest -> catalog -> splits -> dedup -> embed, and taxonomy when a table is set."""

from typing import NamedTuple

from kfp import dsl
from kfp.dsl import Dataset

from embedpipe.components import build_components
from embedpipe.config import ConfigError, Settings
from embedpipe.core import storage
from embedpipe.models.registry import get_entry
from embedpipe.pipelines.cluster import place
from embedpipe.pipelines.stages import compiled_sections, describe

PIPELINE_NAME = "embedpipe-preprocess"


def stages(settings: Settings) -> tuple[str, ...]:
    """The stages this pipeline runs; whether taxonomy runs is fixed when compiling."""
    optional = ("taxonomy",) if settings.taxonomy.table else ()
    return ("ingest", "catalog", "split", *optional, "dedup", "embed")


def build_pipeline(settings: Settings):
    """The pipeline, with every stage's settings taken from ``settings`` explicitly."""
    parts = build_components(settings.images.data_image, settings.images.gpu_image)
    sections = compiled_sections(settings, stages(settings))
    model_entry = get_entry(settings.embed.model, settings.models).model_dump_json()
    cluster, embed_cfg = settings.cluster, settings.embed

    class Outputs(NamedTuple):
        images: Dataset
        catalog: Dataset
        splits: Dataset
        embeddings: Dataset

    @dsl.pipeline(
        name=PIPELINE_NAME,
        description=describe(
            "Images -> Parquet shards -> catalog -> splits -> dedup -> embeddings", sections
        ),
        pipeline_root=cluster.pipeline_root or None,
    )
    def preprocess(
        sources: list[str],
        ingest: dict = {},  # noqa: B006 (KFP reads the defaults from the signature)
        catalog: dict = {},  # noqa: B006
        split: dict = {},  # noqa: B006
        taxonomy: dict = {},  # noqa: B006
        dedup: dict = {},  # noqa: B006
        embed: dict = {},  # noqa: B006
    ) -> Outputs:
        check_task = parts.check_settings(
            settings=sections,
            ingest=ingest,
            catalog=catalog,
            split=split,
            taxonomy=taxonomy,
            dedup=dedup,
            embed=embed,
        )
        place(check_task, cluster, cache=True)
        ingest_task = parts.ingest(
            sources=sources, settings=sections["ingest"], overrides=ingest
        ).after(check_task)
        # The sources are URIs whose content KFP cannot see: never reuse a cached ingest.
        # Every later step is a function of its input artifacts and parameters: cached.
        place(ingest_task, cluster, cache=False)
        images = ingest_task.outputs["images"]
        catalog_task = parts.catalog(images=images, settings=sections["catalog"], overrides=catalog)
        place(catalog_task, cluster, cache=True)
        split_task = parts.split(
            catalog=catalog_task.outputs["catalog"], settings=sections["split"], overrides=split
        )
        place(split_task, cluster, cache=True)
        dedup_task = parts.dedup(
            images=images,
            splits=split_task.outputs["splits"],
            settings=sections["dedup"],
            overrides=dedup,
        )
        place(dedup_task, cluster, cache=True)
        embed_task = parts.embed(
            images=images,
            select=dedup_task.outputs["kept"],
            settings=sections["embed"],
            overrides=embed,
            model_entry=model_entry,
        )
        place(
            embed_task,
            cluster,
            cache=True,
            accelerator_type=embed_cfg.accelerator_type,
            accelerator_limit=embed_cfg.accelerator_limit,
        )
        if "taxonomy" in sections:
            taxonomy_task = parts.taxonomy(
                images=images, settings=sections["taxonomy"], overrides=taxonomy
            )
            place(taxonomy_task, cluster, cache=True)
        return Outputs(
            images=images,
            catalog=catalog_task.outputs["catalog"],
            splits=split_task.outputs["splits"],
            embeddings=embed_task.outputs["embeddings"],
        )

    return preprocess


def run_arguments(settings: Settings) -> dict:
    if not settings.paths.sources:
        raise ConfigError("[paths].sources: the preprocess pipeline needs at least one source")
    return {"sources": [storage.normalize(source) for source in settings.paths.sources]}
