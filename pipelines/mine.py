"""mine: partition by category -> ParallelFor(mine) -> Collected -> combine -> to_hf."""

from typing import NamedTuple

from kfp import dsl
from kfp.dsl import HTML, Dataset

from embedpipe.config import Settings
from embedpipe.pipelines.local import local_inputs
from embedpipe.pipelines.stages import Graph, describe

PIPELINE_NAME = "embedpipe-mine"
STAGES = ("mine", "combine", "to_hf")
# Where each input comes from in a local preprocess run (see pipelines/local.py).
LOCAL_OUTPUTS = {
    "images": ("preprocess", "ingest/images"),
    "metadata": ("preprocess", "dedup/kept"),
    "embeddings": ("preprocess", "embed/embeddings"),
}


def import_dataset(uri):
    return dsl.importer(artifact_uri=uri, artifact_class=Dataset, reimport=False).output


def add_mining_steps(graph: Graph, images, metadata, embeddings, after) -> dict:
    """Partition, the per-category fan-out, combine and the HF export, after ``after``."""
    cfg = graph.settings.mine
    partitioned = graph.parts.partition(images=images, metadata=metadata, embeddings=embeddings)
    graph.place(partitioned if after is None else partitioned.after(after))
    component = "mine_gpu" if cfg.accelerator_type else "mine"
    with dsl.ParallelFor(partitioned.outputs["Output"], parallelism=cfg.parallelism) as category:
        per_category = graph.step(
            component, "mine", partitions=partitioned.outputs["partitions"], category=category
        )
    combined = graph.step(
        "combine", "combine", per_category=dsl.Collected(per_category.outputs["negatives"])
    )
    exported = graph.step("to_hf", "to_hf", negatives=combined.outputs["combined"], images=images)
    return {
        "negatives": combined.outputs["combined"],
        "hf_dataset": exported.outputs["hf_dataset"],
        "mining_report": combined.outputs["report"],
    }


def build_pipeline(settings: Settings):
    class Outputs(NamedTuple):
        negatives: Dataset
        hf_dataset: Dataset
        mining_report: HTML

    @dsl.pipeline(
        name=PIPELINE_NAME,
        description=describe(
            "Per-category hard negatives, combined, as a HF Dataset",
            {stage: settings.section(stage) for stage in STAGES},
        ),
        pipeline_root=settings.cluster.pipeline_root or None,
    )
    def mine_pipeline(
        images_uri: str,
        metadata_uri: str,
        embeddings_uri: str,
        mine: dict = {},  # noqa: B006 (KFP reads the defaults from the signature)
        combine: dict = {},  # noqa: B006
        to_hf: dict = {},  # noqa: B006
    ) -> Outputs:
        graph = Graph.of(settings, STAGES, dict(mine=mine, combine=combine, to_hf=to_hf))
        outputs = add_mining_steps(
            graph,
            import_dataset(images_uri),
            import_dataset(metadata_uri),
            import_dataset(embeddings_uri),
            graph.check(),
        )
        return Outputs(**outputs)

    return mine_pipeline


def run_arguments(settings: Settings) -> dict:
    """Inputs from [paths], or else from the latest local preprocess run."""
    return local_inputs(settings, LOCAL_OUTPUTS)
