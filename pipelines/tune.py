"""tune: the train pipeline's inputs -> a search over [train] settings -> the final
training with the best parameters -> the model.

With ``[tune].backend = "optuna"`` the search is one step on the GPU image whose trials
train in its pod; with ``"katib"`` a launcher on the data image runs a Katib Experiment
whose trials are TrainJobs (or Jobs) on the GPU pool. Either way the search step outputs
the run's [train] overrides with the best parameters on top, which the train step takes.

A space with ``mine.KEY`` filters re-mines each trial's negatives (from the splits and the
embeddings, with [mine] and [combine]); the search also outputs the run's [mine] overrides
with the best filters on top, and a ``mine-negatives`` step re-mines with them the
negatives the final training takes. Such a pipeline has [mine] and [combine] stages (run
parameters ``mine`` and ``combine``), which are left out otherwise.
"""

import json
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
from embedpipe.tune.space import searches_mining

PIPELINE_NAME = "embedpipe-tune"
STAGES = ("tune", "train")
MINING_STAGES = ("mine", "combine")  # when the space searches [mine] filters


def stages(settings: Settings) -> tuple[str, ...]:
    """The search and the final training, and the mining it re-runs when it searches
    [mine] filters (fixed when compiling)."""
    return STAGES + (MINING_STAGES if searches_mining(settings.tune.space) else ())


def _section(graph: Graph, stage: str) -> tuple[dict, dict]:
    """A stage's compiled section and the run's overrides; a stage the pipeline does not
    run (mining, in a tune pipeline that searches no filter) is compiled, not overridden."""
    if stage in graph.sections:
        return graph.sections[stage], graph.overrides[stage]
    return graph.settings.section(stage), {}


def add_tune_step(graph: Graph, after=None, **inputs):
    """The search: trials in this step's pod (Optuna, on the GPU pool like training), or
    a launcher of a Katib Experiment (data image)."""
    settings = graph.settings
    (mine_settings, mine_overrides), (combine_settings, combine_overrides) = (
        _section(graph, "mine"),
        _section(graph, "combine"),
    )
    common = dict(
        **inputs,
        settings=graph.sections["tune"],
        overrides=graph.overrides["tune"],
        train_settings=graph.sections["train"],
        train_overrides=graph.overrides["train"],
        mine_settings=mine_settings,
        mine_overrides=mine_overrides,
        combine_settings=combine_settings,
        combine_overrides=combine_overrides,
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
                **common,
                model_entry=get_entry(cfg.model, settings.models).model_dump_json(),
                models=json.dumps(settings.models, sort_keys=True),
            ),
            settings.cluster,
            cache=True,
            accelerator_type=cfg.accelerator_type,
            accelerator_limit=cfg.accelerator_limit,
        )
    return task.after(after) if after is not None else task


def add_best_negatives_step(graph: Graph, tuned, splits, embeddings, negatives=None, **_inputs):
    """The negatives the final training takes: when the search varied [mine] filters,
    every category re-mined with the best ones (one ``mine-negatives`` step, on the GPU
    pool when [mine] asks for an accelerator); else ``negatives``, as mined."""
    if not searches_mining(graph.settings.tune.space):
        return negatives
    component = "mine_negatives_gpu" if graph.settings.mine.accelerator_type else "mine_negatives"
    task = graph.step(
        component,
        "mine",
        overrides=tuned.outputs["best_mine_overrides"],
        metadata=splits,
        embeddings=embeddings,
        combine_settings=graph.sections["combine"],
        combine_overrides=graph.overrides["combine"],
    )
    return task.outputs["negatives"]


def build_pipeline(settings: Settings):
    own_stages = stages(settings)

    class Outputs(NamedTuple):
        model: Model
        report: HTML
        best: Artifact

    @dsl.pipeline(
        name=PIPELINE_NAME,
        description=describe(
            f"Search [train] settings ({settings.tune.backend}), then train with the best",
            {stage: settings.section(stage) for stage in own_stages},
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
        mine: dict = {},  # noqa: B006 (read when the space searches [mine] filters)
        combine: dict = {},  # noqa: B006
    ) -> Outputs:
        overrides = {"tune": tune, "train": train, "mine": mine, "combine": combine}
        graph = Graph.of(settings, own_stages, overrides)
        inputs = dict(
            images=import_dataset(images_uri),
            splits=import_dataset(splits_uri),
            negatives=import_dataset(negatives_uri),
            embeddings=import_dataset(embeddings_uri),
        )
        tune_task = add_tune_step(graph, graph.check(), **inputs)
        inputs["negatives"] = add_best_negatives_step(graph, tune_task, **inputs)
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
