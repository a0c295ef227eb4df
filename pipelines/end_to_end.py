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
    """Tuning runs when [tune.space] names settings to search, mining when training takes
    image pairs (images paired with signals take no mined image negatives); both fixed
    when compiling."""
    tuning = ("tune",) if settings.tune.space else ()
    mining = () if settings.train.pairs == "image_signal" else MINE_STAGES
    return (*preprocess.stages(settings), *mining, *tuning, "train", "evaluate", "publish")


def build_pipeline(settings: Settings):
    own_stages = stages(settings)

    mined_outputs = [("negatives", Dataset)] if "mine" in own_stages else []
    Outputs = NamedTuple(
        "Outputs",
        [
            ("embeddings", Dataset),
            *mined_outputs,
            ("model", Model),
            ("evaluation", Dataset),
            ("evaluation_report", HTML),
            ("published", Model),
        ],
    )

    @dsl.pipeline(
        name=PIPELINE_NAME,
        description=describe(
            "Images -> preprocess -> "
            + ("hard negatives -> " if "mine" in own_stages else "")
            + "training -> evaluation before and after -> a published model"
            + (
                ""
                if "mine" in own_stages
                else " (images paired with signals: the mine, "
                "combine and to_hf parameters are not used)"
            ),
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
        inputs = dict(images=data["images"], splits=data["splits"], embeddings=data["embeddings"])
        negatives = None
        if "mine" in graph.sections:  # not for images paired with signals
            mined = add_mining_steps(
                graph, data["images"], data["kept"], data["embeddings"], after=None
            )
            inputs["negatives"] = negatives = mined["negatives"]
        best = None
        if "tune" in graph.sections:
            tuned = add_tune_step(graph, **inputs)
            best = tuned.outputs["best_overrides"]
            if "negatives" in inputs:
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
            **({"negatives": negatives} if negatives is not None else {}),
            model=model,
            evaluation=evaluated.outputs["evaluation"],
            evaluation_report=evaluated.outputs["report"],
            published=published.outputs["published"],
        )

    return end_to_end


def run_arguments(settings: Settings) -> dict:
    return preprocess.run_arguments(settings)


def summary(outputs: dict[str, str]) -> list[str]:
    """What a finished local run shows last: the held-out metrics before and after
    training, where the reports are, and how to load the published model."""
    from embedpipe.core import storage
    from embedpipe.core.datasets import side_path
    from embedpipe.evaluate.stage import METRICS_NAME
    from embedpipe.publish import usage

    evaluated = storage.read_json(side_path(outputs["evaluate/evaluation"], METRICS_NAME))
    runs = {run["model"]: run for run in evaluated["models"]}
    published = outputs["publish/published"]
    image = usage.example_image(outputs["ingest/images"]) if "ingest/images" in outputs else ""
    load = usage.load_line(published, image or usage.PLACEHOLDER_IMAGE)
    if evaluated.get("kind") == "image_signal":
        learned = signal_summary(runs)
        mined = ""
    else:
        learned = [_before_after("held-out recall@1", runs, "image_image_recall@1")]
        mined = f", {outputs['combine/report']} (hard negatives)"
    return [
        *learned,
        f"reports: {outputs['evaluate/report']} (evaluation), {outputs['train/report']} "
        f"(training), {outputs['dedup/report']} (duplicates){mined}",
        f"published model: {published}",
        f"load it and embed a picture (Python): {load}",
    ]


SOURCE_ORDER = ("image", "signal", "both")


def signal_summary(runs: dict[str, dict]) -> list[str]:
    """Images paired with signals: cross-modal recall@1 and each scalar target's R²
    (Ridge probe) from each modality's embeddings, untrained -> trained."""
    lines = [
        _before_after("held-out image->signal recall@1", runs, "image_to_signal_recall@1"),
        _before_after("held-out signal->image recall@1", runs, "signal_to_image_recall@1"),
    ]
    regression = runs.get("trained", {}).get("regression", {})
    targets = dict.fromkeys(
        name for probes in regression.values() for name in probes.get("ridge", {})
    )
    for target in targets:
        parts = []
        for source in sorted(regression, key=SOURCE_ORDER.index):
            before, after = (
                runs.get(model, {})
                .get("regression", {})
                .get(source, {})
                .get("ridge", {})
                .get(target)
                for model in ("untrained", "trained")
            )
            parts.append(f"{source} {_shown(before)} -> {_shown(after)}")
        lines.append(f"held-out {target.removesuffix('_r2')} R² (Ridge) from " + ", ".join(parts))
    return lines


def _before_after(label: str, runs: dict[str, dict], metric: str) -> str:
    before, after = (
        runs.get(model, {}).get("metrics", {}).get(metric) for model in ("untrained", "trained")
    )
    return f"{label}: untrained {_shown(before)} -> trained {_shown(after)}"


def _shown(value) -> str:
    return "n/a" if value is None else f"{value:.2f}"
