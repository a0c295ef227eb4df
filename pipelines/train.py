"""train: images, splits, mined negatives and embeddings -> a trained model (or head)."""

import json
from typing import NamedTuple

from kfp import dsl
from kfp.dsl import HTML, Model

from embedpipe.config import Settings
from embedpipe.models.registry import get_entry
from embedpipe.pipelines.local import local_inputs
from embedpipe.pipelines.mine import import_dataset
from embedpipe.pipelines.stages import Graph, describe

PIPELINE_NAME = "embedpipe-train"
STAGES = ("train",)
# Where each input comes from in local preprocess and mine runs (see pipelines/local.py).
LOCAL_OUTPUTS = {
    "images": ("preprocess", "ingest/images"),
    "splits": ("preprocess", "split/splits"),
    "embeddings": ("preprocess", "embed/embeddings"),
    "negatives": ("mine", "combine/combined"),
}


def add_train_step(graph: Graph, after=None, overrides=None, **inputs):
    """The train step (images, splits, negatives, embeddings), on the GPU pool when
    ``[train].accelerator_type`` is set; past one node (``[train].num_nodes`` > 1) a
    launcher on the data image that runs a Kubeflow Trainer TrainJob instead.
    ``overrides`` replaces the run's [train] overrides (the tune step's best ones)."""
    settings, cfg = graph.settings, graph.settings.train
    given = graph.overrides["train"] if overrides is None else overrides
    if cfg.num_nodes > 1:
        from embedpipe.kube.objects import check_cluster_model

        check_cluster_model(cfg, settings.models)
        task = graph.place(
            graph.parts.train_job(
                **inputs,
                settings=graph.sections["train"],
                overrides=given,
                trainer_image=settings.images.gpu_image,
                cluster=settings.cluster.model_dump(mode="json"),
                run_id=dsl.PIPELINE_JOB_ID_PLACEHOLDER,
                task_name=dsl.PIPELINE_TASK_NAME_PLACEHOLDER,
            )
        )
    else:
        model_entry = get_entry(cfg.model, settings.models).model_dump_json()
        models = json.dumps(settings.models, sort_keys=True)
        task = graph.step(
            "train", "train", overrides=given, **inputs, model_entry=model_entry, models=models
        )
    return task.after(after) if after is not None else task


def build_pipeline(settings: Settings):
    class Outputs(NamedTuple):
        model: Model
        report: HTML

    @dsl.pipeline(
        name=PIPELINE_NAME,
        description=describe(
            "Mined hard negatives -> a trained embedding model",
            {stage: settings.section(stage) for stage in STAGES},
        ),
        pipeline_root=settings.cluster.pipeline_root or None,
    )
    def train_pipeline(
        images_uri: str,
        splits_uri: str,
        embeddings_uri: str,
        negatives_uri: str = "",  # images paired with signals take none
        train: dict = {},  # noqa: B006 (KFP reads the defaults from the signature)
    ) -> Outputs:
        graph = Graph.of(settings, STAGES, {"train": train})
        mined = {} if signal_pairs(settings) else {"negatives": import_dataset(negatives_uri)}
        task = add_train_step(
            graph,
            graph.check(),
            images=import_dataset(images_uri),
            splits=import_dataset(splits_uri),
            embeddings=import_dataset(embeddings_uri),
            **mined,
        )
        return Outputs(model=task.outputs["model"], report=task.outputs["report"])

    return train_pipeline


def signal_pairs(settings: Settings) -> bool:
    """Images paired with signals: trained without mined negatives."""
    return settings.train.pairs == "image_signal"


def run_arguments(settings: Settings) -> dict:
    """Inputs from [paths], or else from the latest local preprocess and mine runs (no
    mine run for images paired with signals)."""
    wanted = dict(LOCAL_OUTPUTS)
    if signal_pairs(settings):
        del wanted["negatives"]
    return local_inputs(settings, wanted)
