"""The model card (README.md): a YAML header the Hub reads, then what a reader needs to
trust the model: where its data came from, how it was trained and evaluated, its size."""

from __future__ import annotations

import json
from collections import Counter
from dataclasses import dataclass, field
from typing import Any

from embedpipe.config import PublishSettings
from embedpipe.core import datasets, storage
from embedpipe.core.schemas import DEDUP_KIND

UNKNOWN = "unknown (not given to `embedpipe publish`)"
CLASSIFICATION_METRICS = ("acc", "top1", "top5", "mean_per_class_recall", "per_class")


@dataclass
class CardInputs:
    name: str
    kind: str  # "open_clip" or "head"
    entry: dict[str, Any]  # the model's (or the head's backbone's) registry entry
    training: dict[str, Any]  # resolved training settings from the checkpoint's config.json
    parameters: int
    bytes_by_dtype: dict[str, int]
    repo_id: str = ""
    head: dict[str, Any] = field(default_factory=dict)
    backbone_weights: str = ""  # a head's: the weights its backbone embedded with
    metrics: list[tuple[str, str, float]] = field(default_factory=list)  # dataset, metric, value
    lineage: list[dict[str, Any]] = field(default_factory=list)


def read_metrics(uri: str) -> list[tuple[str, str, float]]:
    """(dataset, metric, value) for every number in an evaluation's metrics.json: flat
    ({"acc1": 0.5}) or nested by dataset or task ({"imagenet": {"acc1": 0.5}})."""
    data = storage.read_json(uri)  # a StorageError names the file
    if not isinstance(data, dict):
        raise ValueError(f"{uri}: expected a JSON object of metrics")
    if isinstance(data.get("models"), list) and data["models"]:
        # `embedpipe evaluate` of several models side by side: the card is the last one's
        # (the trained model, evaluated after its baseline).
        data = data["models"][-1].get("metrics") or {}
    found: list[tuple[str, str, float]] = []

    def walk(node: dict, path: list[str], dataset: str) -> None:
        dataset = node["dataset"] if isinstance(node.get("dataset"), str) else dataset
        for key, value in node.items():
            if isinstance(value, dict):
                walk(value, [*path, key], dataset)
            elif isinstance(value, int | float) and not isinstance(value, bool):
                where = dataset or "/".join(p for p in path if p != "metrics") or "evaluation"
                found.append((where, key, float(value)))

    walk(data, [], "")
    if not found:
        raise ValueError(f"{uri}: no numeric metrics in this file")
    return found


def read_lineage(uri: str) -> dict[str, Any]:
    """What a dataset (images, catalog, splits, selection) or a dedup output says about the
    data: kind, rows, sources, images per split, duplicate and leakage figures."""
    manifest = datasets.read_manifest(uri)
    kind = manifest.get("kind", "unknown")
    info: dict[str, Any] = {"uri": uri, "kind": kind, "rows": manifest.get("rows")}
    if manifest.get("sources"):
        info["sources"] = list(manifest["sources"])
    if kind == DEDUP_KIND:
        info["rows"] = None
        info["dedup"] = dict(manifest.get("metrics") or {})
        leakage_uri = datasets.side_path(uri, "leakage.json")
        if storage.exists(leakage_uri):
            info["leakage"] = storage.read_json(leakage_uri)
        return info
    if manifest.get("shards"):
        try:
            splits = datasets.read_table(uri, columns=["split"]).column("split").to_pylist()
            info["splits"] = dict(Counter("(none)" if s is None else s for s in splits))
        except (KeyError, ValueError, datasets.DatasetError):
            pass  # a dataset without a split column
    return info


def _task_of(metric: str) -> tuple[str, str]:
    lowered = metric.lower()
    if any(word in lowered for word in CLASSIFICATION_METRICS):
        return "zero-shot-image-classification", "Zero-shot image classification"
    if "retrieval" in lowered:
        return "image-feature-extraction", "Image-text retrieval"
    return "image-feature-extraction", "Embedding evaluation"


def _header(inputs: CardInputs, config: PublishSettings) -> str:
    from huggingface_hub import EvalResult, ModelCardData

    results = []
    for dataset, metric, value in inputs.metrics:
        task_type, task_name = _task_of(metric)
        results.append(
            EvalResult(
                task_type=task_type,
                task_name=task_name,
                dataset_type=dataset,
                dataset_name=dataset,
                metric_type=metric,
                metric_name=metric,
                metric_value=value,
            )
        )
    if inputs.kind == "head":
        library, pipeline_tag = "transformers", "image-feature-extraction"
        base_tags = ["embedpipe", "projection-head", inputs.entry.get("name", "")]
    else:
        library, pipeline_tag = "open_clip", "zero-shot-image-classification"
        base_tags = ["embedpipe", "open_clip", "clip"]
    tags = list(dict.fromkeys(t for t in [*base_tags, *config.tags] if t))
    data = ModelCardData(
        library_name=library,
        license=config.license,
        tags=tags,
        pipeline_tag=pipeline_tag,
        datasets=list(config.datasets) or None,
        model_name=inputs.name,
        eval_results=results or None,
    )
    return f"---\n{data.to_yaml()}\n---\n"


def _cell(value: Any) -> str:
    text = value if isinstance(value, str) else json.dumps(value, sort_keys=True)
    return text.replace("|", "\\|").replace("\n", " ")


def _flatten(settings: dict[str, Any], prefix: str = "") -> list[tuple[str, Any]]:
    rows = []
    for key, value in sorted(settings.items()):
        if isinstance(value, dict) and value:
            rows += _flatten(value, f"{prefix}{key}.")
        else:
            rows.append((f"{prefix}{key}", value))
    return rows


def _lineage_section(lineage: list[dict[str, Any]]) -> list[str]:
    lines = ["## Data lineage", ""]
    if not lineage:
        lines += [
            f"Source URIs, counts, splits, duplicates and leakage: {UNKNOWN}; pass the "
            "datasets with `--lineage` (the images dataset, the dedup output).",
            "",
        ]
        return lines
    for info in lineage:
        rows = info.get("rows")
        lines.append(f"- `{info['uri']}` ({info['kind']}" + (f", {rows} rows)" if rows else ")"))
        for source in info.get("sources", []):
            lines.append(f"  - source: `{source}`")
        if info.get("splits"):
            counts = ", ".join(f"{k}: {v}" for k, v in sorted(info["splits"].items()))
            lines.append(f"  - images per split: {counts}")
        if "dedup" in info:
            figures = ", ".join(f"{k}: {v}" for k, v in sorted(info["dedup"].items()))
            lines.append(f"  - duplicates: {figures or 'unknown'}")
        if "leakage" in info:
            leakage = info["leakage"]
            lines.append(f"  - groups spanning splits (leakage): {leakage.get('leaking_groups')}")
            for category, figures in sorted((leakage.get("by_category") or {}).items()):
                lines.append(
                    f"    - {category}: {figures.get('groups')} groups, "
                    f"{figures.get('images')} images, {_cell(figures.get('splits', {}))}"
                )
    if not any("sources" in info for info in lineage):
        lines.append(f"- source URIs: {UNKNOWN} (give the images dataset)")
    if not any("dedup" in info for info in lineage):
        lines.append(f"- duplicates and cross-split leakage: {UNKNOWN} (give the dedup output)")
    return [*lines, ""]


def _usage(inputs: CardInputs) -> list[str]:
    where = f"hf-hub:{inputs.repo_id}" if inputs.repo_id else "local-dir:PATH"
    if inputs.kind == "head":
        backbone = inputs.entry
        return [
            "```python",
            "from transformers import AutoModel",
            f'head = AutoModel.from_pretrained("{inputs.repo_id or "PATH"}", '
            "trust_remote_code=True)",
            "projected = head(backbone_image_embeddings)  # (batch, "
            f"{inputs.head.get('in_dim')}) -> (batch, {inputs.head.get('out_dim')})",
            "```",
            "",
            f"The head's input is the image embeddings of the backbone `{backbone.get('name')}` "
            f"({backbone.get('library')} `{backbone.get('architecture')}`, weights "
            f"`{inputs.backbone_weights or backbone.get('pretrained') or 'unknown'}`), named "
            "in `config.json` (`backbone`). With embedpipe: "
            "`embedpipe embed --weights HEAD_CHECKPOINT`.",
        ]
    return [
        "```python",
        "import open_clip",
        f'model, _, preprocess = open_clip.create_model_and_transforms("{where}")',
        f'tokenizer = open_clip.get_tokenizer("{where}")',
        "```",
        "",
        f"With embedpipe: `embedpipe embed IMAGES --weights {where} --out EMBEDDINGS` "
        "(no registry entry needed).",
    ]


def render_card(inputs: CardInputs, config: PublishSettings) -> str:
    entry = inputs.entry
    described = (
        f"a projection head ({inputs.head.get('depth')} layer(s), "
        f"{inputs.head.get('in_dim')} -> {inputs.head.get('out_dim')}) on the frozen backbone "
        f"`{entry.get('name')}`"
        if inputs.kind == "head"
        else f"an open_clip `{entry.get('architecture')}` image-text model "
        f"({entry.get('embed_dim')}-d embeddings, {entry.get('image_size')} px input)"
    )
    lines = [
        _header(inputs, config),
        f"# {inputs.name}",
        "",
        f"{inputs.name} is {described}, published by embedpipe.",
        "",
        "## Use",
        "",
        *_usage(inputs),
        "",
        *_lineage_section(inputs.lineage),
        "## Training settings",
        "",
    ]
    if inputs.training:
        lines += ["| setting | value |", "|---|---|"]
        lines += [f"| {key} | {_cell(value)} |" for key, value in _flatten(inputs.training)]
    else:
        lines.append("Training settings: unknown (none recorded in the checkpoint's config.json).")
    lines += ["", "## Evaluation", ""]
    if inputs.metrics:
        lines += ["| dataset | metric | value |", "|---|---|---|"]
        lines += [f"| {d} | {m} | {v:.4f} |" for d, m, v in inputs.metrics]
    else:
        lines.append(f"Evaluation: {UNKNOWN}; pass an evaluation's metrics.json with --metrics.")
    intended = config.intended_use or (
        "Image embeddings for retrieval, clustering, deduplication and zero-shot "
        "classification of images like those it was trained on; research and internal tools."
    )
    limits = config.limitations or (
        "Trained on the data listed above only: expect worse embeddings on other domains. "
        "Zero-shot labels inherit the biases of the training captions. Not for decisions "
        "about people, nor for identifying individuals."
    )
    lines += ["", "## Intended use", "", intended, "", "## Limitations", "", limits, ""]
    lines += ["## Model size", "", f"- parameters: {inputs.parameters:,}"]
    for dtype, size in sorted(inputs.bytes_by_dtype.items()):
        lines.append(f"- weights stored as {dtype}: {size:,} bytes")
    lines += [
        f"- at float32: {inputs.parameters * 4:,} bytes; at bfloat16/float16: "
        f"{inputs.parameters * 2:,} bytes",
        "",
    ]
    return "\n".join(lines)
