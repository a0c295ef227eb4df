"""train: images, splits, mined negatives and embeddings -> a trained model (or head)."""

from typing import NamedTuple

from kfp import dsl
from kfp.dsl import HTML, Model

from embedpipe.components import build_components
from embedpipe.config import ConfigError, Settings
from embedpipe.core import storage
from embedpipe.models.registry import get_entry
from embedpipe.pipelines.cluster import place
from embedpipe.pipelines.stages import compiled_sections, describe

PIPELINE_NAME = "embedpipe-train"
STAGES = ("train",)
# Where each input comes from in local preprocess and mine runs (see pipelines/local.py).
LOCAL_OUTPUTS = {
    "images": ("preprocess", "ingest/images"),
    "splits": ("preprocess", "split/splits"),
    "embeddings": ("preprocess", "embed/embeddings"),
    "negatives": ("mine", "combine/combined"),
}


def import_dataset(uri):
    return dsl.importer(artifact_uri=uri, artifact_class=dsl.Dataset, reimport=False).output


def add_train_step(parts, settings: Settings, sections: dict, overrides, **inputs):
    """The train step, on the GPU pool when ``[train].accelerator_type`` is set; past one
    node (``[train].num_nodes`` > 1) a launcher on the data image that runs a Kubeflow
    Trainer TrainJob instead."""
    cfg = settings.train
    if cfg.num_nodes > 1:
        from embedpipe.kube.objects import check_cluster_model

        check_cluster_model(cfg, settings.models)
        task = parts.train_job(
            **inputs,
            settings=sections["train"],
            overrides=overrides,
            trainer_image=settings.images.gpu_image,
            cluster=settings.cluster.model_dump(mode="json"),
            run_id=dsl.PIPELINE_JOB_ID_PLACEHOLDER,
            task_name=dsl.PIPELINE_TASK_NAME_PLACEHOLDER,
        )
        return place(task, settings.cluster, cache=True)
    task = parts.train(
        **inputs,
        settings=sections["train"],
        overrides=overrides,
        model_entry=get_entry(cfg.model, settings.models).model_dump_json(),
    )
    return place(
        task,
        settings.cluster,
        cache=True,
        accelerator_type=cfg.accelerator_type,
        accelerator_limit=cfg.accelerator_limit,
    )


def build_pipeline(settings: Settings):
    parts = build_components(settings.images.data_image, settings.images.gpu_image)
    sections = compiled_sections(settings, STAGES)

    class Outputs(NamedTuple):
        model: Model
        report: HTML

    @dsl.pipeline(
        name=PIPELINE_NAME,
        description=describe("Mined hard negatives -> a trained embedding model", sections),
        pipeline_root=settings.cluster.pipeline_root or None,
    )
    def train_pipeline(
        images_uri: str,
        splits_uri: str,
        negatives_uri: str,
        embeddings_uri: str,
        train: dict = {},  # noqa: B006 (KFP reads the defaults from the signature)
    ) -> Outputs:
        check_task = parts.check_settings(settings=sections, train=train)
        place(check_task, settings.cluster, cache=True)
        train_task = add_train_step(
            parts,
            settings,
            sections,
            train,
            images=import_dataset(images_uri),
            splits=import_dataset(splits_uri),
            negatives=import_dataset(negatives_uri),
            embeddings=import_dataset(embeddings_uri),
        ).after(check_task)
        return Outputs(model=train_task.outputs["model"], report=train_task.outputs["report"])

    return train_pipeline


def run_arguments(settings: Settings) -> dict:
    """Inputs from [paths], or else from the latest local preprocess and mine runs."""
    from embedpipe.pipelines.local import latest_outputs

    paths = settings.paths
    given = {name: getattr(paths, name) for name in LOCAL_OUTPUTS}
    for name, (pipeline, output) in LOCAL_OUTPUTS.items():
        if given[name]:
            continue
        latest = latest_outputs(settings, pipeline)
        if latest is None:
            raise ConfigError(
                f"[paths].{name} is not set and no local {pipeline} run was found; run "
                f"`embedpipe run {pipeline}` first or set it"
            )
        given[name] = latest[output]
    return {f"{k}_uri": storage.normalize(v) for k, v in given.items()}
