"""mine: partition by category -> ParallelFor(mine) -> Collected -> combine -> to-hf."""

from typing import NamedTuple

from kfp import dsl
from kfp.dsl import Dataset

from embedpipe.components import build_components
from embedpipe.config import ConfigError, Settings
from embedpipe.core import storage
from embedpipe.pipelines.cluster import place

PIPELINE_NAME = "embedpipe-mine"
# Where each input comes from in a local preprocess run (see pipelines/local.py).
PREPROCESS_OUTPUTS = {
    "images": "ingest/images",
    "metadata": "dedup/kept",
    "embeddings": "embed/embeddings",
}


def build_pipeline(settings: Settings):
    parts = build_components(settings.images.data_image, settings.images.gpu_image)
    cfg, cluster = settings.mine, settings.cluster
    mine_one = parts.mine_gpu if cfg.accelerator_type else parts.mine

    class Outputs(NamedTuple):
        negatives: Dataset
        hf_dataset: Dataset

    @dsl.pipeline(
        name=PIPELINE_NAME,
        description="Per-category hard negatives, combined, as a HF Dataset",
        pipeline_root=cluster.pipeline_root or None,
    )
    def mine(
        images_uri: str,
        metadata_uri: str,
        embeddings_uri: str,
        top_k: int = cfg.top_k,
        query_splits: list[str] = list(cfg.query_splits),  # noqa: B006
        candidate_splits: list[str] = list(cfg.candidate_splits),  # noqa: B006
        band_names: list[str] = list(cfg.band_names),  # noqa: B006
        band_quantiles: list[float] = list(cfg.band_quantiles),  # noqa: B006
        index: str = cfg.index,
        exact_max: int = cfg.exact_max,
        num_samples: int = cfg.num_samples,
        max_positives: int = cfg.max_positives,
        seed: int = cfg.seed,
    ) -> Outputs:
        images = dsl.importer(artifact_uri=images_uri, artifact_class=Dataset, reimport=False)
        metadata = dsl.importer(artifact_uri=metadata_uri, artifact_class=Dataset, reimport=False)
        embeddings = dsl.importer(
            artifact_uri=embeddings_uri, artifact_class=Dataset, reimport=False
        )
        partitioned = parts.partition(metadata=metadata.output, embeddings=embeddings.output)
        place(partitioned, cluster, cache=True)
        with dsl.ParallelFor(
            partitioned.outputs["Output"], parallelism=cfg.parallelism
        ) as category:
            per_category = mine_one(
                partitions=partitioned.outputs["partitions"],
                category=category,
                top_k=top_k,
                query_splits=query_splits,
                candidate_splits=candidate_splits,
                band_names=band_names,
                band_quantiles=band_quantiles,
                index=index,
                exact_max=exact_max,
                seed=seed,
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
            num_samples=num_samples,
            seed=seed,
        )
        place(combined, cluster, cache=True)
        hf_dataset = parts.to_hf(
            negatives=combined.outputs["combined"],
            images=images.output,
            max_positives=max_positives,
            seed=seed,
        )
        place(hf_dataset, cluster, cache=True)
        return Outputs(
            negatives=combined.outputs["combined"], hf_dataset=hf_dataset.outputs["hf_dataset"]
        )

    return mine


def run_arguments(settings: Settings) -> dict:
    """Inputs from [mine], or else from the latest local preprocess run."""
    from embedpipe.pipelines.local import latest_outputs

    cfg = settings.mine
    given = {"images": cfg.images, "metadata": cfg.metadata, "embeddings": cfg.embeddings}
    if not all(given.values()):
        latest = latest_outputs(settings, "preprocess")
        if latest is None:
            raise ConfigError(
                "[mine]: images, metadata and embeddings are not all set and no local "
                "preprocess run was found; run `embedpipe run preprocess` first or set them"
            )
        given = {k: v or latest[PREPROCESS_OUTPUTS[k]] for k, v in given.items()}
    return {f"{k}_uri": storage.normalize(v) for k, v in given.items()}
