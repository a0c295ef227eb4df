"""end_to_end: images in, a published model out.

preprocess -> the mining fan-out -> tuning (when [tune.space] is set) -> training ->
evaluation of the untrained and the trained model side by side -> publishing, from the
same step-adding functions the single pipelines use, behind one first step that checks
every stage's settings.
"""

from typing import NamedTuple

from kfp import dsl
from kfp.dsl import HTML, Dataset, Model

from embedpipe.config import Settings
from embedpipe.pipelines import preprocess
from embedpipe.pipelines.evaluate import add_evaluate_step
from embedpipe.pipelines.mine import STAGES as MINE_STAGES
from embedpipe.pipelines.mine import add_mining_steps
from embedpipe.pipelines.stages import Graph, describe
from embedpipe.pipelines.train import add_train_step
from embedpipe.pipelines.tune import add_best_negatives_step, add_tune_step

PIPELINE_NAME = "embedpipe-end-to-end"


def stages(settings: Settings) -> tuple[str, ...]:
    """Tuning runs when [tune.space] names settings to search (fixed when compiling)."""
    tuning = ("tune",) if settings.tune.space else ()
    return (*preprocess.stages(settings), *MINE_STAGES, *tuning, "train", "evaluate", "publish")


def build_pipeline(settings: Settings):
    own_stages = stages(settings)

    class Outputs(NamedTuple):
        embeddings: Dataset
        negatives: Dataset
        model: Model
        evaluation: Dataset
        evaluation_report: HTML
        published: Model

    @dsl.pipeline(
        name=PIPELINE_NAME,
        description=describe(
            "Images -> preprocess -> hard negatives -> training -> evaluation before and "
            "after -> a published model",
            {stage: settings.section(stage) for stage in own_stages},
        ),
        pipeline_root=settings.cluster.pipeline_root or None,
    )
    def end_to_end(
        sources: list[str],
        ingest: dict = {},  # noqa: B006 (KFP reads the defaults from the signature)
        catalog: dict = {},  # noqa: B006
        split: dict = {},  # noqa: B006
        taxonomy: dict = {},  # noqa: B006
        dedup: dict = {},  # noqa: B006
        embed: dict = {},  # noqa: B006
        mine: dict = {},  # noqa: B006
        combine: dict = {},  # noqa: B006
        to_hf: dict = {},  # noqa: B006
        tune: dict = {},  # noqa: B006
        train: dict = {},  # noqa: B006
        evaluate: dict = {},  # noqa: B006
        publish: dict = {},  # noqa: B006
    ) -> Outputs:
        overrides = dict(
            ingest=ingest,
            catalog=catalog,
            split=split,
            taxonomy=taxonomy,
            dedup=dedup,
            embed=embed,
            mine=mine,
            combine=combine,
            to_hf=to_hf,
            tune=tune,
            train=train,
            evaluate=evaluate,
            publish=publish,
        )
        graph = Graph.of(settings, own_stages, overrides)
        data = preprocess.add_preprocess_steps(graph, sources, graph.check())
        mined = add_mining_steps(
            graph, data["images"], data["kept"], data["embeddings"], after=None
        )
        inputs = dict(
            images=data["images"],
            splits=data["splits"],
            negatives=mined["negatives"],
            embeddings=data["embeddings"],
        )
        best = None
        if "tune" in graph.sections:
            tuned = add_tune_step(graph, **inputs)
            best = tuned.outputs["best_overrides"]
            inputs["negatives"] = add_best_negatives_step(graph, tuned, **inputs)
        trained = add_train_step(graph, overrides=best, **inputs)
        model = trained.outputs["model"]
        evaluated = add_evaluate_step(
            graph,
            metadata=data["splits"],
            select=data["kept"],
            images=data["images"],
            baseline=data["embeddings"],
            model=model,
        )
        published = graph.step(
            "publish",
            "publish",
            checkpoint=model,
            images=data["images"],
            dedup=data["dedup"],
            evaluation=evaluated.outputs["evaluation"],
        )
        return Outputs(
            embeddings=data["embeddings"],
            negatives=mined["negatives"],
            model=model,
            evaluation=evaluated.outputs["evaluation"],
            evaluation_report=evaluated.outputs["report"],
            published=published.outputs["published"],
        )

    return end_to_end


def run_arguments(settings: Settings) -> dict:
    return preprocess.run_arguments(settings)


def summary(outputs: dict[str, str]) -> list[str]:
    """What a finished local run shows last: held-out recall@1 before and after training
    (DECISIONS 13's metric), where the reports are, and how to load the published model."""
    from embedpipe.core import storage
    from embedpipe.core.datasets import side_path
    from embedpipe.evaluate.stage import METRICS_NAME
    from embedpipe.publish import usage

    evaluated = storage.read_json(side_path(outputs["evaluate/evaluation"], METRICS_NAME))
    recall = {
        run["model"]: run["metrics"].get("image_image_recall@1") for run in evaluated["models"]
    }
    published = outputs["publish/published"]
    image = usage.example_image(outputs["ingest/images"]) if "ingest/images" in outputs else ""
    load = usage.load_line(published, image or usage.PLACEHOLDER_IMAGE)

    def shown(value) -> str:
        return "n/a" if value is None else f"{value:.2f}"

    return [
        f"held-out recall@1: untrained {shown(recall.get('untrained'))} -> "
        f"trained {shown(recall.get('trained'))}",
        f"reports: {outputs['evaluate/report']} (evaluation), {outputs['train/report']} "
        f"(training), {outputs['dedup/report']} (duplicates), {outputs['combine/report']} "
        "(hard negatives)",
        f"published model: {published}",
        f"load it and embed a picture (Python): {load}",
    ]
