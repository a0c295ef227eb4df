"""preprocess: ingest -> catalog -> splits -> dedup -> embed, and taxonomy when a table is set."""

from typing import NamedTuple

from kfp import dsl
from kfp.dsl import Dataset

from embedpipe.config import ConfigError, Settings
from embedpipe.core import storage
from embedpipe.models.registry import get_entry
from embedpipe.pipelines.stages import Graph, describe

PIPELINE_NAME = "embedpipe-preprocess"


def stages(settings: Settings) -> tuple[str, ...]:
    """The stages this pipeline runs; whether taxonomy runs is fixed when compiling."""
    optional = ("taxonomy",) if settings.taxonomy.table else ()
    return ("ingest", "catalog", "split", *optional, "dedup", "embed")


def add_embed_steps(graph: Graph, images, select):
    """One embed step, or ``[embed].parallelism`` of them over contiguous groups of the
    input shards (each on a GPU of the pool on a cluster) and a merge."""
    model_entry = get_entry(graph.settings.embed.model, graph.settings.models).model_dump_json()
    inputs = dict(images=images, select=select, model_entry=model_entry)
    groups = graph.settings.embed.parallelism
    if groups == 1:
        return graph.step("embed", "embed", **inputs).outputs["embeddings"]
    with dsl.ParallelFor(list(range(groups)), parallelism=groups) as group:
        part = graph.step("embed", "embed", **inputs, group=group, groups=groups)
    merged = graph.parts.merge_embeddings(parts=dsl.Collected(part.outputs["embeddings"]))
    return graph.place(merged).outputs["embeddings"]


def add_preprocess_steps(graph: Graph, sources, after) -> dict:
    """The preprocess steps after ``after``; returns their datasets by name."""
    # The sources are URIs whose content KFP cannot see: never reuse a cached ingest.
    # Every later step is a function of its input artifacts and parameters: cached.
    ingest = graph.step("ingest", "ingest", cache=False, sources=sources).after(after)
    images = ingest.outputs["images"]
    catalog = graph.step("catalog", "catalog", images=images)
    split = graph.step("split", "split", catalog=catalog.outputs["catalog"])
    dedup = graph.step("dedup", "dedup", images=images, splits=split.outputs["splits"])
    embeddings = add_embed_steps(graph, images, dedup.outputs["kept"])
    if "taxonomy" in graph.sections:
        graph.step("taxonomy", "taxonomy", images=images)
    return {
        "images": images,
        "catalog": catalog.outputs["catalog"],
        "splits": split.outputs["splits"],
        "kept": dedup.outputs["kept"],
        "dedup": dedup.outputs["dedup"],
        "embeddings": embeddings,
    }


def build_pipeline(settings: Settings):
    """The pipeline, with every stage's settings taken from ``settings`` explicitly."""
    own_stages = stages(settings)

    class Outputs(NamedTuple):
        images: Dataset
        catalog: Dataset
        splits: Dataset
        embeddings: Dataset

    @dsl.pipeline(
        name=PIPELINE_NAME,
        description=describe(
            "Images -> Parquet shards -> catalog -> splits -> dedup -> embeddings",
            {stage: settings.section(stage) for stage in own_stages},
        ),
        pipeline_root=settings.cluster.pipeline_root or None,
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
        overrides = dict(
            ingest=ingest, catalog=catalog, split=split, taxonomy=taxonomy, dedup=dedup, embed=embed
        )
        graph = Graph.of(settings, own_stages, overrides)
        outputs = add_preprocess_steps(graph, sources, graph.check())
        return Outputs(**{name: outputs[name] for name in Outputs._fields})

    return preprocess


def run_arguments(settings: Settings) -> dict:
    if not settings.paths.sources:
        raise ConfigError("[paths].sources: the preprocess pipeline needs at least one source")
    return {"sources": [storage.normalize(source) for source in settings.paths.sources]}
