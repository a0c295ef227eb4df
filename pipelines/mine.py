"""mine: partition by category -> ParallelFor(mine) -> Collected -> combine -> to_hf."""

from typing import NamedTuple

from kfp import dsl
from kfp.dsl import Dataset

from embedpipe.components import build_components
from embedpipe.config import ConfigError, Settings
from embedpipe.core import storage
from embedpipe.pipelines.cluster import place
from embedpipe.pipelines.stages import compiled_sections, describe

PIPELINE_NAME = "embedpipe-mine"
STAGES = ("mine", "combine", "to_hf")
# Where each input comes from in a local preprocess run (see pipelines/local.py).
PREPROCESS_OUTPUTS = {
    "images": "ingest/images",
    "metadata": "dedup/kept",
    "embeddings": "embed/embeddings",
}


def build_pipeline(settings: Settings):
    parts = build_components(settings.images.data_image, settings.images.gpu_image)
    sections = compiled_sections(settings, STAGES)
    cfg, cluster = settings.mine, settings.cluster
    mine_one = parts.mine_gpu if cfg.accelerator_type else parts.mine

    class Outputs(NamedTuple):
        negatives: Dataset
        hf_dataset: Dataset

    @dsl.pipeline(
        name=PIPELINE_NAME,
        description=describe("Per-category hard negatives, combined, as a HF Dataset", sections),
        pipeline_root=cluster.pipeline_root or None,
    )
    def mine_pipeline(
        images_uri: str,
        metadata_uri: str,
        embeddings_uri: str,
        mine: dict = {},  # noqa: B006 (KFP reads the defaults from the signature)
        combine: dict = {},  # noqa: B006
        to_hf: dict = {},  # noqa: B006
    ) -> Outputs:
        check_task = parts.check_settings(
            settings=sections, mine=mine, combine=combine, to_hf=to_hf
        )
        place(check_task, cluster, cache=True)
        images = dsl.importer(artifact_uri=images_uri, artifact_class=Dataset, reimport=False)
        metadata = dsl.importer(artifact_uri=metadata_uri, artifact_class=Dataset, reimport=False)
        embeddings = dsl.importer(
            artifact_uri=embeddings_uri, artifact_class=Dataset, reimport=False
        )
        partitioned = parts.partition(
            images=images.output, metadata=metadata.output, embeddings=embeddings.output
        ).after(check_task)
        place(partitioned, cluster, cache=True)
        with dsl.ParallelFor(
            partitioned.outputs["Output"], parallelism=cfg.parallelism
        ) as category:
            per_category = mine_one(
                partitions=partitioned.outputs["partitions"],
                category=category,
                settings=sections["mine"],
                overrides=mine,
            )
            place(
                per_category,
                cluster,
                cache=True,
                accelerator_type=cfg.accelerator_type,
                accelerator_limit=cfg.accelerator_limit,
            )
        combined = parts.combine(
            per_category=dsl.Collected(per_category.outputs["negatives"]),
            settings=sections["combine"],
            overrides=combine,
        )
        place(combined, cluster, cache=True)
        hf_dataset = parts.to_hf(
            negatives=combined.outputs["combined"],
            images=images.output,
            settings=sections["to_hf"],
            overrides=to_hf,
        )
        place(hf_dataset, cluster, cache=True)
        return Outputs(
            negatives=combined.outputs["combined"], hf_dataset=hf_dataset.outputs["hf_dataset"]
        )

    return mine_pipeline


def run_arguments(settings: Settings) -> dict:
    """Inputs from [paths], or else from the latest local preprocess run."""
    from embedpipe.pipelines.local import latest_outputs

    paths = settings.paths
    given = {"images": paths.images, "metadata": paths.metadata, "embeddings": paths.embeddings}
    if not all(given.values()):
        latest = latest_outputs(settings, "preprocess")
        if latest is None:
            raise ConfigError(
                "[paths]: images, metadata and embeddings are not all set and no local "
                "preprocess run was found; run `embedpipe run preprocess` first or set them"
            )
        given = {k: v or latest[PREPROCESS_OUTPUTS[k]] for k, v in given.items()}
    return {f"{k}_uri": storage.normalize(v) for k, v in given.items()}
