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

from embedpipe.config import Settings
from embedpipe.models.registry import get_entry
from embedpipe.pipelines.cluster import place
from embedpipe.pipelines.mine import import_dataset
from embedpipe.pipelines.stages import Graph, describe
from embedpipe.pipelines.train import add_train_step
from embedpipe.pipelines.train import run_arguments as train_run_arguments

PIPELINE_NAME = "embedpipe-tune"
STAGES = ("tune", "train")


def add_tune_step(graph: Graph, after=None, **inputs):
    """The search: trials in this step's pod (Optuna, on the GPU pool like training), or
    a launcher of a Katib Experiment (data image)."""
    settings = graph.settings
    common = dict(
        **inputs,
        settings=graph.sections["tune"],
        overrides=graph.overrides["tune"],
        train_settings=graph.sections["train"],
        train_overrides=graph.overrides["train"],
    )
    if settings.tune.backend == "katib":
        from embedpipe.kube.objects import check_cluster_model

        check_cluster_model(settings.train, settings.models)
        task = graph.place(
            graph.parts.tune_katib(
                **common,
                trial_image=settings.images.gpu_image,
                cluster=settings.cluster.model_dump(mode="json"),
                run_id=dsl.PIPELINE_JOB_ID_PLACEHOLDER,
                task_name=dsl.PIPELINE_TASK_NAME_PLACEHOLDER,
            )
        )
    else:
        cfg = settings.train
        task = place(
            graph.parts.tune(
                **common, model_entry=get_entry(cfg.model, settings.models).model_dump_json()
            ),
            settings.cluster,
            cache=True,
            accelerator_type=cfg.accelerator_type,
            accelerator_limit=cfg.accelerator_limit,
        )
    return task.after(after) if after is not None else task


def build_pipeline(settings: Settings):
    class Outputs(NamedTuple):
        model: Model
        report: HTML
        best: Artifact

    @dsl.pipeline(
        name=PIPELINE_NAME,
        description=describe(
            f"Search [train] settings ({settings.tune.backend}), then train with the best",
            {stage: settings.section(stage) for stage in STAGES},
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
        graph = Graph.of(settings, STAGES, {"tune": tune, "train": train})
        inputs = dict(
            images=import_dataset(images_uri),
            splits=import_dataset(splits_uri),
            negatives=import_dataset(negatives_uri),
            embeddings=import_dataset(embeddings_uri),
        )
        tune_task = add_tune_step(graph, graph.check(), **inputs)
        train_task = add_train_step(graph, overrides=tune_task.outputs["best_overrides"], **inputs)
        return Outputs(
            model=train_task.outputs["model"],
            report=train_task.outputs["report"],
            best=tune_task.outputs["best"],
        )

    return tune_pipeline


def run_arguments(settings: Settings) -> dict:
    """The train pipeline's inputs: [paths], or the latest local preprocess and mine runs."""
    return train_run_arguments(settings)
