"""evaluate: a trained model beside the embeddings it started from, on the same images."""

import json
from typing import NamedTuple

from kfp import dsl
from kfp.dsl import HTML, Dataset, Model

from embedpipe.config import Settings
from embedpipe.pipelines.local import local_inputs
from embedpipe.pipelines.mine import import_dataset
from embedpipe.pipelines.stages import Graph, describe

PIPELINE_NAME = "embedpipe-evaluate"
STAGES = ("evaluate",)
# Where each input comes from in local runs (see pipelines/local.py).
LOCAL_OUTPUTS = {
    "splits": ("preprocess", "split/splits"),
    "select": ("preprocess", "dedup/kept"),
    "images": ("preprocess", "ingest/images"),
    "embeddings": ("preprocess", "embed/embeddings"),
    "model": ("train", "train/model"),
}


def add_evaluate_step(graph: Graph, **inputs):
    """Untrained (``baseline`` embeddings) and trained (``model``) side by side."""
    models = json.dumps(graph.settings.models, sort_keys=True)
    return graph.step("evaluate", "evaluate", **inputs, models=models)


def build_pipeline(settings: Settings):
    class Outputs(NamedTuple):
        evaluation: Dataset
        report: HTML

    @dsl.pipeline(
        name=PIPELINE_NAME,
        description=describe(
            "A trained model beside its starting embeddings: zero-shot, retrieval, "
            "image->image recall per category, probes, anomalies",
            {stage: settings.section(stage) for stage in STAGES},
        ),
        pipeline_root=settings.cluster.pipeline_root or None,
    )
    def evaluate_pipeline(
        splits_uri: str,
        select_uri: str,
        images_uri: str,
        embeddings_uri: str,
        model_uri: str,
        evaluate: dict = {},  # noqa: B006 (KFP reads the defaults from the signature)
    ) -> Outputs:
        graph = Graph.of(settings, STAGES, {"evaluate": evaluate})
        model = dsl.importer(artifact_uri=model_uri, artifact_class=Model, reimport=False)
        task = add_evaluate_step(
            graph,
            metadata=import_dataset(splits_uri),
            select=import_dataset(select_uri),
            images=import_dataset(images_uri),
            baseline=import_dataset(embeddings_uri),
            model=model.output,
        ).after(graph.check())
        return Outputs(evaluation=task.outputs["evaluation"], report=task.outputs["report"])

    return evaluate_pipeline


def run_arguments(settings: Settings) -> dict:
    """Inputs from [paths], or else from the latest local preprocess and train runs."""
    return local_inputs(settings, LOCAL_OUTPUTS)
