"""tune: the train pipeline's inputs -> a search over [train] settings -> the final
training with the best parameters -> the model.

With ``[tune].backend = "optuna"`` the search is one step on the GPU image whose trials
train in its pod; with ``"katib"`` a launcher on the data image runs a Katib Experiment
whose trials are TrainJobs (or Jobs) on the GPU pool. Either way the search step outputs
the run's [train] overrides with the best parameters on top, which the train step takes.
"""

from typing import NamedTuple

from kfp import dsl
from kfp.dsl import HTML, Artifact, Model

from embedpipe.components import build_components
from embedpipe.config import Settings
from embedpipe.models.registry import get_entry
from embedpipe.pipelines.cluster import place
from embedpipe.pipelines.stages import compiled_sections, describe
from embedpipe.pipelines.train import add_train_step, import_dataset
from embedpipe.pipelines.train import run_arguments as train_run_arguments

PIPELINE_NAME = "embedpipe-tune"
STAGES = ("tune", "train")


def add_tune_step(parts, settings: Settings, sections: dict, tune, train, **inputs):
    common = dict(
        **inputs,
        settings=sections["tune"],
        overrides=tune,
        train_settings=sections["train"],
        train_overrides=train,
    )
    if settings.tune.backend == "katib":
        from embedpipe.kube.objects import check_cluster_model

        check_cluster_model(settings.train, settings.models)
        task = parts.tune_katib(
            **common,
            trial_image=settings.images.gpu_image,
            cluster=settings.cluster.model_dump(mode="json"),
            run_id=dsl.PIPELINE_JOB_ID_PLACEHOLDER,
            task_name=dsl.PIPELINE_TASK_NAME_PLACEHOLDER,
        )
        return place(task, settings.cluster, cache=True)
    cfg = settings.train
    task = parts.tune(**common, model_entry=get_entry(cfg.model, settings.models).model_dump_json())
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
        best: Artifact

    @dsl.pipeline(
        name=PIPELINE_NAME,
        description=describe(
            f"Search [train] settings ({settings.tune.backend}), then train with the best",
            sections,
        ),
        pipeline_root=settings.cluster.pipeline_root or None,
    )
    def tune_pipeline(
        images_uri: str,
        splits_uri: str,
        negatives_uri: str,
        embeddings_uri: str,
        tune: dict = {},  # noqa: B006 (KFP reads the defaults from the signature)
        train: dict = {},  # noqa: B006
    ) -> Outputs:
        check_task = parts.check_settings(settings=sections, tune=tune, train=train)
        place(check_task, settings.cluster, cache=True)
        inputs = dict(
            images=import_dataset(images_uri),
            splits=import_dataset(splits_uri),
            negatives=import_dataset(negatives_uri),
            embeddings=import_dataset(embeddings_uri),
        )
        tune_task = add_tune_step(parts, settings, sections, tune, train, **inputs)
        tune_task.after(check_task)
        train_task = add_train_step(
            parts, settings, sections, tune_task.outputs["best_overrides"], **inputs
        )
        return Outputs(
            model=train_task.outputs["model"],
            report=train_task.outputs["report"],
            best=tune_task.outputs["best"],
        )

    return tune_pipeline


def run_arguments(settings: Settings) -> dict:
    """The train pipeline's inputs: [paths], or the latest local preprocess and mine runs."""
    return train_run_arguments(settings)
