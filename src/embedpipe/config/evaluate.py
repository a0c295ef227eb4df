"""Settings of the evaluate stage: zero-shot, retrieval, probes, anomalies, plots."""

from __future__ import annotations

from typing import Literal

from pydantic import Field, field_validator

from embedpipe.config.base import COMPILE_TIME, COMPILE_TIME_FLAG, Section

TASKS = ("zeroshot", "retrieval", "image_retrieval", "linear_probe", "regression_probe", "anomaly")


class EvaluateSettings(Section):
    tasks: tuple[str, ...] = Field(
        (),
        description="tasks to run (" + ", ".join(TASKS) + "); empty: every task whose "
        "ground truth the data holds, the others skipped with the reason in the report",
    )
    model: str = Field(
        "",
        description="registry entry for --weights that are a file, 'random' or an s3:// prefix",
        json_schema_extra=COMPILE_TIME_FLAG,
    )
    label_column: str = Field(
        "auto", description="column of the class labels; auto: `label` if present, else `concept`"
    )
    class_names: tuple[str, ...] = Field(
        (),
        description="zero-shot classes in order (extra names are distractor classes); "
        "empty: the data's labels, sorted",
    )
    class_map_file: str = Field(
        "", description="JSON file {label: class name}, e.g. wnid_to_label.json"
    )
    template_set: Literal["openai_imagenet", "simple_imagenet", "photo"] = Field(
        "openai_imagenet", description="built-in zero-shot prompt templates"
    )
    templates: tuple[str, ...] = Field(
        (), description="custom prompt templates with {c} for the class name (replace the set)"
    )
    caption_column: str = Field(
        "auto",
        description="captions for image-text retrieval: a text or list-of-texts column; "
        "auto: `captions`, else `caption`; prompt: the first template with the class name",
    )
    eval_split: str = Field(
        "", description="rows for zero-shot, image-text retrieval and anomalies; empty: all"
    )
    query_split: str = Field(
        "val", description="image->image retrieval: split of the queries (held-out concepts)"
    )
    recall_k: tuple[int, ...] = Field((1, 5, 10), description="K of every recall@K")
    probe_label_column: str = Field(
        "category", description="labels of the linear probe (concepts of a concept split differ)"
    )
    probe_train_split: str = Field("train", description="probes fit on this split")
    probe_eval_split: str = Field("val", description="probes are scored on this split")
    probe_c: float = Field(1.0, gt=0.0, description="inverse regularisation of the linear probe")
    probe_max_iter: int = Field(1000, gt=0, description="iterations of the linear probe")
    regression_columns: tuple[str, ...] = Field(
        (), description="numeric columns the regression probe predicts (R^2)"
    )
    regression_alpha: float = Field(1.0, ge=0.0, description="Ridge penalty; 0: least squares")
    regression_neighbors: int = Field(
        10,
        gt=0,
        description="images paired with signals: the kNN regression probe's neighbours "
        "(cosine, averaged), beside the Ridge probe",
    )
    anomaly_neighbors: int = Field(
        10, gt=0, description="kNN anomaly score: mean distance to this many neighbours"
    )
    anomaly_trees: int = Field(100, gt=0, description="IsolationForest trees")
    anomaly_top: int = Field(20, ge=0, description="most anomalous images shown with thumbnails")
    projection: Literal["auto", "pca", "umap"] = Field(
        "auto", description="2-D projection of the plot; auto: UMAP when installed, else PCA"
    )
    plot_points: int = Field(5000, gt=0, description="images sampled for the projection plot")
    seed: int = Field(0, description="seed of probes, IsolationForest and plot sampling")
    batch_size: int = Field(64, gt=0, description="images per forward pass (models only)")
    device: str = Field("auto", description="auto, cpu, cuda or cuda:N")
    precision: Literal["auto", "fp32", "amp_bf16", "bf16", "pure_bf16", "fp16"] = Field(
        "auto",
        description="models only, as embed: fp32; amp_bf16 (autocast); bf16 or pure_bf16 "
        "(bf16 weights); fp16 (autocast); auto: bf16 on GPU, fp32 on CPU",
    )
    tokenizer_dir: str = Field("", description="local tokenizer for hub-tokenizer models")
    accelerator_type: str = Field(
        "",
        description="GPU the cluster step requests, e.g. nvidia.com/gpu",
        json_schema_extra=COMPILE_TIME,
    )

    @field_validator("tasks")
    @classmethod
    def _known_tasks(cls, value: tuple[str, ...]) -> tuple[str, ...]:
        unknown = [task for task in value if task not in TASKS]
        if unknown:
            raise ValueError(f"unknown task {unknown[0]!r}; known: {', '.join(TASKS)}")
        return value

    @field_validator("templates")
    @classmethod
    def _templates_name_the_class(cls, value: tuple[str, ...]) -> tuple[str, ...]:
        missing = [template for template in value if "{c}" not in template]
        if missing:
            raise ValueError(f"template {missing[0]!r} has no {{c}} for the class name")
        return value

    @field_validator("recall_k")
    @classmethod
    def _positive_k(cls, value: tuple[int, ...]) -> tuple[int, ...]:
        if not value or any(k < 1 for k in value):
            raise ValueError("must be a non-empty list of positive integers")
        return tuple(sorted(set(value)))
