"""The model card (README.md): a YAML header the Hub reads, then what a reader needs to
trust the model: where its data came from, how it was trained and evaluated, its size."""

from __future__ import annotations

import json
import os
from collections import Counter
from dataclasses import dataclass, field
from typing import Any

from embedpipe.config import PublishSettings
from embedpipe.core import datasets, storage
from embedpipe.core.schemas import DEDUP_KIND

UNKNOWN = "unknown (not given to `embedpipe publish`)"
CLASSIFICATION_METRICS = ("acc", "top1", "top5", "mean_per_class_recall", "per_class")
IMAGE_SIGNAL = "image_signal"


@dataclass
class CardInputs:
    name: str
    kind: str  # "open_clip", "head" or "image_signal" (a head's image tower, a signal tower)
    entry: dict[str, Any]  # the model's (or the head's backbone's) registry entry
    training: dict[str, Any]  # resolved training settings from the checkpoint's config.json
    parameters: int
    bytes_by_dtype: dict[str, int]
    repo_id: str = ""
    head: dict[str, Any] = field(default_factory=dict)
    backbone_weights: str = ""  # a head's: the weights its backbone embedded with
    normalize_input: bool = True  # a head's: it learnt from L2-normalised backbone features
    preprocess: dict[str, Any] = field(default_factory=dict)  # open_clip's preprocess_cfg
    metrics: list[tuple[str, str, float]] = field(default_factory=list)  # dataset, metric, value
    lineage: list[dict[str, Any]] = field(default_factory=list)
    signal: dict[str, Any] = field(default_factory=dict)  # image_signal: the signal tower
    image_form: str = "head"  # image_signal: its image tower as a head or fine-tuned open_clip


def _as_head(inputs: CardInputs) -> bool:
    """Published as a transformers head on a backbone (a head, or a head image tower)."""
    return inputs.kind == "head" or (inputs.kind == IMAGE_SIGNAL and inputs.image_form == "head")


def _shared_dim(inputs: CardInputs) -> Any:
    return inputs.head.get("out_dim") if inputs.head else inputs.entry.get("embed_dim")


def _metrics_of(uri: str, models: list, identity: str) -> dict:
    """The metrics of the published checkpoint among an evaluation's models (``embedpipe
    evaluate`` records each model's identity): picked by identity, never by position."""
    runs = [run for run in models if isinstance(run, dict)]
    matching = [run for run in runs if run.get("identity") == identity]
    if len(runs) == 1 and "identity" not in runs[0]:
        matching = runs  # one model, evaluated before identities were recorded
    if not matching:
        names = ", ".join(str(run.get("model")) for run in runs)
        raise ValueError(
            f"--metrics {uri}: none of its models ({names}) is the checkpoint being published; "
            "evaluate it (--weights CHECKPOINT) and pass that metrics.json"
        )
    picked = matching[-1]
    regression = picked.get("regression")  # images paired with signals: R² per source, probe
    return {**(picked.get("metrics") or {}), **({"regression": regression} if regression else {})}


def read_metrics(uri: str, identity: str = "") -> list[tuple[str, str, float]]:
    """(dataset, metric, value) for every number in an evaluation's metrics.json: flat
    ({"acc1": 0.5}), nested by dataset or task ({"imagenet": {"acc1": 0.5}}), or one entry
    per model (``embedpipe evaluate``), of which the one whose identity is ``identity``."""
    data = storage.read_json(uri)  # a StorageError names the file
    if not isinstance(data, dict):
        raise ValueError(f"{uri}: expected a JSON object of metrics")
    if isinstance(data.get("models"), list) and data["models"]:
        data = _metrics_of(uri, data["models"], identity)
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
    if "signal" in lowered and "recall" in lowered:
        return "image-feature-extraction", "Image-signal retrieval"
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
    if _as_head(inputs):
        library, pipeline_tag = "transformers", "image-feature-extraction"
        base_tags = ["embedpipe", "projection-head", inputs.entry.get("name", "")]
    elif inputs.kind == IMAGE_SIGNAL:  # a fine-tuned open_clip image tower: image-only
        library, pipeline_tag = "open_clip", "image-feature-extraction"
        base_tags = ["embedpipe", "open_clip", inputs.entry.get("name", "")]
    else:
        library, pipeline_tag = "open_clip", "zero-shot-image-classification"
        base_tags = ["embedpipe", "open_clip", "clip"]
    if inputs.kind == IMAGE_SIGNAL:
        base_tags += ["image-signal", (inputs.signal.get("entry") or {}).get("name", "")]
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


def is_private_path(value: str) -> bool:
    """A local path or a bucket: meaningless to a reader of the card, maybe private."""
    value = value.removeprefix("local-dir:")
    return bool(value) and (
        storage.is_s3(value) or os.path.isabs(value) or ("/" in value and os.path.exists(value))
    )


def public_name(value: str) -> str:
    """``value`` as the card may show it: a path or bucket URI by its last name only."""
    if not is_private_path(value):
        return value
    return os.path.basename(os.path.normpath(value.removeprefix("local-dir:"))) or "(a path)"


def _public(value: Any) -> Any:
    if isinstance(value, str):
        return public_name(value)
    if isinstance(value, list | tuple):
        return [_public(item) for item in value]
    if isinstance(value, dict):
        return {key: _public(item) for key, item in value.items()}
    return value


def _cell(value: Any) -> str:
    value = _public(value)
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
        where = public_name(info["uri"])
        lines.append(f"- `{where}` ({info['kind']}" + (f", {rows} rows)" if rows else ")"))
        for source in info.get("sources", []):
            lines.append(f"  - source: `{public_name(source)}`")
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


def _takes(inputs: CardInputs, out_dim: Any) -> str:
    """What the model takes and returns, from the preprocessing it was published with."""
    cfg = inputs.preprocess
    size = cfg.get("size")
    side = size[0] if isinstance(size, list | tuple) else size
    resize = {
        "squash": f"resizes it to {side}x{side} px",
        "longest": f"resizes its longest side to {side} px and pads it to {side}x{side}",
    }.get(cfg.get("resize_mode"), f"resizes its shortest side to {side} px and centre-crops it")
    return (
        f"Takes an RGB picture of any size (the preprocessing {resize}, "
        f"{cfg.get('interpolation', 'bicubic')} interpolation, then normalises with mean "
        f"{_cell(cfg.get('mean'))} and std {_cell(cfg.get('std'))}, as the backbone was fed); "
        f"returns one L2-normalised {out_dim}-d embedding per picture."
    )


def _usage(inputs: CardInputs) -> list[str]:
    pushed = bool(inputs.repo_id)
    if _as_head(inputs):
        out_dim = inputs.head.get("out_dim")
        model_id = inputs.repo_id or "PATH"
        said = "the Hub repo" if pushed else "replace PATH with this model's folder"
        return [
            _takes(inputs, out_dim),
            "",
            "```python",
            "import torch",
            "from PIL import Image",
            "from transformers import AutoImageProcessor, AutoModel",
            "",
            f'model_id = "{model_id}"  # {said}',
            "processor = AutoImageProcessor.from_pretrained(model_id, trust_remote_code=True)",
            "model = AutoModel.from_pretrained(model_id, trust_remote_code=True).eval()",
            'image = Image.open("IMAGE.jpg")  # replace IMAGE.jpg with your picture',
            "with torch.no_grad():",
            f'    embedding = model(**processor(images=image, return_tensors="pt"))  '
            f"# (1, {out_dim})",
            "```",
            "",
            "`model.get_image_features(pixel_values)` is the same as calling the model; "
            "`model.embed(images)` takes PIL images (or a pixel tensor) directly.",
            "",
            "Requires `torch`, `transformers` and `open_clip_torch` (`pip install transformers "
            "open_clip_torch`): `trust_remote_code=True` runs `modeling_embedpipe_head.py` of "
            "this model, which builds the backbone's image tower and preprocesses with "
            "open_clip. embedpipe is not needed; with it, `embedpipe embed IMAGES --weights "
            f"{'hf-hub:' + inputs.repo_id if pushed else 'local-dir:PATH'} --out EMBEDDINGS` "
            "writes the same embeddings.",
        ]
    where = f"hf-hub:{inputs.repo_id}" if pushed else "local-dir:PATH"
    said = "" if pushed else "  # replace PATH with this model's folder"
    texts = bool(inputs.entry.get("text"))
    takes = _takes(inputs, inputs.entry.get("embed_dim"))
    return [
        takes.replace(
            "embedding per picture.", "embedding per picture, and texts in the same space."
        )
        if texts
        else takes,
        "",
        "```python",
        "import open_clip",
        "import torch",
        "from PIL import Image",
        "",
        f'model, _, preprocess = open_clip.create_model_and_transforms("{where}"){said}',
        *([f'tokenizer = open_clip.get_tokenizer("{where}")'] if texts else []),
        "model.eval()",
        'image = preprocess(Image.open("IMAGE.jpg")).unsqueeze(0)  # replace IMAGE.jpg with '
        "your picture",
        "with torch.no_grad():",
        "    embedding = model.encode_image(image, normalize=True)",
        *(
            ['    text = model.encode_text(tokenizer(["a photo of a bird"]), normalize=True)']
            if texts
            else []
        ),
        "```",
        "",
        *(
            []
            if texts
            else [
                "Only the image tower was trained: the text tower open_clip builds beside it "
                "holds random weights; use `encode_image`, not `encode_text`.",
                "",
            ]
        ),
        f"With embedpipe: `embedpipe embed IMAGES --weights {where} --out EMBEDDINGS` "
        "(no registry entry needed).",
    ]


def _backbone_section(inputs: CardInputs) -> list[str]:
    if not _as_head(inputs):
        return []
    entry, head = inputs.entry, inputs.head
    weights = inputs.backbone_weights or entry.get("pretrained") or "unknown"
    return [
        "## Backbone and head",
        "",
        f"- backbone: the image tower of `{entry.get('name')}` ({entry.get('library')} "
        f"`{entry.get('architecture')}`, {entry.get('embed_dim')}-d features, "
        f"{entry.get('image_size')} px input), weights `{weights}`; "
        "its weights are in this model's `model.safetensors` (`visual.*`)",
        f"- head: {head.get('depth')} linear layer(s), {head.get('in_dim')} -> "
        f"{head.get('out_dim')} (width {head.get('width')}, {head.get('activation')}), on the "
        "backbone's features "
        + ("L2-normalised" if inputs.normalize_input else "as they are")
        + " (`head.*`)",
        "",
    ]


def _signal_length(signal: dict[str, Any]) -> str:
    length = signal.get("signal_length")
    return f"signals of {length} values" if length else "signals of any length"


def _two_towers_described(inputs: CardInputs) -> str:
    signal, entry = inputs.signal, inputs.entry
    image = (
        f"the image tower of the frozen backbone `{entry.get('name')}` and a projection "
        f"head, {inputs.head.get('in_dim')} -> {inputs.head.get('out_dim')}, in one "
        "transformers model"
        if _as_head(inputs)
        else f"the image tower of the open_clip `{entry.get('architecture')}` model "
        f"`{entry.get('name')}`, fine-tuned, in open_clip's layout"
    )
    return (
        f"a pair of towers trained together (embedpipe's image_signal training) so that "
        f"each image lands next to its own signal in one shared "
        f"{_shared_dim(inputs)}-d space: an image tower ({image}) and a signal tower (the "
        "signal encoder "
        f"`{(signal.get('entry') or {}).get('name')}` over {_signal_length(signal)} of the "
        f"column `{signal.get('column')}`, in `{signal.get('folder')}/`)"
    )


def _signal_section(inputs: CardInputs) -> list[str]:
    if inputs.kind != IMAGE_SIGNAL:
        return []
    signal, entry = inputs.signal, inputs.signal.get("entry") or {}
    folder, column = signal.get("folder"), signal.get("column")
    fetched = (
        f" (first `huggingface-cli download {inputs.repo_id} --local-dir PATH`)"
        if inputs.repo_id
        else ""
    )
    return [
        "## Signal tower",
        "",
        f"- encoder: `{entry.get('name')}` ({entry.get('architecture')}, "
        f"{_cell(entry.get('arch'))}), {signal.get('parameters', 0):,} parameters, in "
        f"`{folder}/` (`model.safetensors`, and `config.json` with its whole entry)",
        f"- takes {_signal_length(signal)} (the images dataset's column `{column}`), each "
        "standardised on its own; returns one L2-normalised "
        f"{entry.get('embed_dim')}-d embedding per signal, in the image tower's space "
        f"(shared dimension {_shared_dim(inputs)})",
        f"- embed signals with embedpipe (the encoder is embedpipe's, pure torch): "
        f"`embedpipe embed-signal IMAGES --column {column} --weights PATH/{folder} "
        f"--out EMBEDDINGS`{fetched}, no --model needed; an image's and a signal's "
        "embeddings compare by their dot product",
        "",
    ]


def render_card(inputs: CardInputs, config: PublishSettings) -> str:
    entry = inputs.entry
    described = (
        f"an image-embedding model: the image tower of the frozen backbone "
        f"`{entry.get('name')}` and a projection head ({inputs.head.get('depth')} layer(s), "
        f"{inputs.head.get('in_dim')} -> {inputs.head.get('out_dim')}) trained on its "
        "embeddings, in one transformers model"
        if inputs.kind == "head"
        else _two_towers_described(inputs)
        if inputs.kind == IMAGE_SIGNAL
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
        *_backbone_section(inputs),
        *_signal_section(inputs),
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
    uses = (
        "retrieval, clustering and deduplication"
        if inputs.kind == "head"
        else "image-to-signal and signal-to-image retrieval, regression of the quantities "
        "both measure, and anomaly detection"
        if inputs.kind == IMAGE_SIGNAL
        else ("retrieval, clustering, deduplication and zero-shot classification")
    )
    what = "Image and signal" if inputs.kind == IMAGE_SIGNAL else "Image"
    like = "images and signals" if inputs.kind == IMAGE_SIGNAL else "images"
    intended = config.intended_use or (
        f"{what} embeddings for {uses} of {like} like those it was trained on; research and "
        "internal tools."
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
