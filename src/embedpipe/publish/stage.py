"""`embedpipe publish`: a checkpoint -> a folder open_clip (or transformers, for a
projection head) loads as is, with its model card; checked by reloading it.

An open_clip checkpoint becomes ``open_clip_config.json`` (model and preprocess config),
``open_clip_model.safetensors``, the tokenizer files of a hub-tokenizer model and README.md:
``open_clip.create_model_and_transforms("local-dir:DIR")`` (or ``"hf-hub:ORG/NAME"`` once
pushed) loads it. A head checkpoint becomes one transformers model that embeds pictures:
the backbone's image tower and the head (``config.json`` with ``auto_map``,
``model.safetensors``, ``modeling_embedpipe_head.py``) and the backbone's preprocessing
(``preprocessor_config.json``), loaded with ``AutoModel`` and ``AutoImageProcessor``
``.from_pretrained(DIR, trust_remote_code=True)`` (see ``head_form``). An image_signal
checkpoint publishes its image tower the same way and its signal tower in
``signal_encoder/``, which ``embed-signal --weights DIR/signal_encoder`` loads (see
``two_towers_form``).

Everything is written to a staging folder and reloaded from there first; only a model
whose reloaded embeddings match the checkpoint's goes to ``--out``, the config file last,
recording the checkpoint's identity: ``--out`` must be empty or hold a previous publish of
the same checkpoint (see ``destination``). The push commits the whole folder at once.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from embedpipe.config import PublishSettings
from embedpipe.core import datasets, outputs, storage
from embedpipe.core.schemas import IMAGES_KIND
from embedpipe.models.backends.base import CONFIG_NAME, EMBEDPIPE_NAME
from embedpipe.models.heads import backbone_of, is_head_config, trained_nested_dims
from embedpipe.models.identity import MODEL_KEYS, checkpoint_identity
from embedpipe.models.loading import RANDOM_WEIGHTS, LoadedModel, fetch_weights, load_model
from embedpipe.models.registry import ModelEntry, ModelError
from embedpipe.models.two_towers import (
    FINETUNE_MODE,
    IMAGE_SIGNAL_KIND,
    image_mode,
    image_tower_record,
    is_two_towers_config,
)
from embedpipe.publish import card, destination, head_form, hub, two_towers_form

log = logging.getLogger(__name__)

OPEN_CLIP_CONFIG = "open_clip_config.json"
OPEN_CLIP_WEIGHTS = "open_clip_model.safetensors"
HEAD_WEIGHTS = "model.safetensors"
CARD_NAME = "README.md"
# Files of the checkpoint that are not the model: never published.
CHECKPOINT_ONLY = ("training_state.pt",)
# What a tokenizer folder may hold besides tokenizer files.
NOT_TOKENIZER = (".safetensors", ".bin", ".pt", ".pth", "config.json", ".md")
CHECK_TEXTS = ["a photo of a bird", "a leaf", "an insect on a flower"]


@dataclass
class PublishResult:
    out_uri: str
    kind: str
    files: list[str]
    parameters: int
    max_difference: float
    pushed: str
    seconds: float


def _read_checkpoint_config(directory: str, uri: str) -> dict[str, Any]:
    path = Path(directory, CONFIG_NAME)
    if not path.is_file():
        if Path(directory, EMBEDPIPE_NAME).is_file():
            raise ModelError(
                f"{uri}: a transformers model checkpoint; publish takes open_clip checkpoints "
                "and projection heads"
            )
        raise ModelError(f"{uri}: not an embedpipe checkpoint (no {CONFIG_NAME})")
    try:
        config = json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as error:
        raise ModelError(f"{uri}/{CONFIG_NAME}: not valid JSON: {error}") from None
    if not isinstance(config, dict) or not (
        is_head_config(config)
        or is_two_towers_config(config)
        or isinstance(config.get("entry"), dict)
    ):
        raise ModelError(f"{uri}/{CONFIG_NAME}: names neither a model 'entry' nor a head")
    return config


def _identity(directory: str, uri: str) -> str:
    try:
        return checkpoint_identity(directory)
    except OSError as error:
        raise ModelError(f"{uri}: cannot read the checkpoint: {error.strerror}") from None


def _training_settings(config: dict[str, Any]) -> dict[str, Any]:
    # "inputs" is the resume check's fingerprint of the training data: not a setting
    rest = {k: v for k, v in config.items() if k not in MODEL_KEYS and k != "inputs"}
    return rest["train"] if set(rest) == {"train"} and isinstance(rest["train"], dict) else rest


def _check_images(count: int, images_uri: str) -> list:
    """The first ``count`` images of a dataset, or ``count`` seeded random images of
    assorted sizes (resizing and cropping are part of what is checked)."""
    from io import BytesIO

    from PIL import Image

    if images_uri:
        manifest = datasets.read_manifest(images_uri, IMAGES_KIND)
        shards = datasets.shard_uris(images_uri, manifest)
        if not shards:
            raise ValueError(f"--check-images {images_uri}: the dataset has no images")
        column = datasets.read_table_file(shards[0], ["image"]).column("image")
        return [Image.open(BytesIO(data)).convert("RGB") for data in column.to_pylist()[:count]]
    rng = np.random.default_rng(0)
    sizes = [(96, 80), (64, 64), (120, 150), (50, 70)]
    return [
        Image.fromarray(rng.integers(0, 256, (*sizes[i % 4], 3), dtype=np.uint8))
        for i in range(count)
    ]


def _card_inputs(
    kind: str, entry: ModelEntry, saved: dict[str, Any], state: dict[str, torch.Tensor], **extra
) -> card.CardInputs:
    """What the card says of a model of ``kind``: its entry, training settings and size."""
    parameters, by_dtype = _size(state)
    return card.CardInputs(
        name="",
        kind=kind,
        entry=entry.model_dump(mode="json"),
        training=_training_settings(saved),
        parameters=parameters,
        bytes_by_dtype=by_dtype,
        **extra,
    )


def _size(state: dict[str, torch.Tensor]) -> tuple[int, dict[str, int]]:
    by_dtype: dict[str, int] = {}
    for tensor in state.values():
        name = str(tensor.dtype).removeprefix("torch.")
        by_dtype[name] = by_dtype.get(name, 0) + tensor.numel() * tensor.element_size()
    return sum(t.numel() for t in state.values()), by_dtype


def _tokenizer_files(model_cfg: dict, config: PublishSettings, staging: Path) -> None:
    """A hub-tokenizer model's tokenizer goes with it: open_clip reads it from the folder."""
    hub_name = (model_cfg.get("text_cfg") or {}).get("hf_tokenizer_name")
    if not hub_name:
        return  # open_clip's own tokenizer: nothing to ship
    if config.tokenizer_dir:
        source = Path(config.tokenizer_dir)
        if not source.is_dir():
            raise FileNotFoundError(f"--tokenizer-dir {source}: no such folder")
        for path in sorted(source.iterdir()):
            if path.is_file() and not path.name.endswith(NOT_TOKENIZER):
                shutil.copyfile(path, staging / path.name)
        return
    from transformers import AutoTokenizer

    try:
        AutoTokenizer.from_pretrained(hub_name).save_pretrained(str(staging))
    except OSError as error:
        raise ModelError(
            f"the model's tokenizer {hub_name} could not be fetched ({type(error).__name__}); "
            "offline, save it with AutoTokenizer.save_pretrained(DIR) and pass --tokenizer-dir"
        ) from None


def _stage_open_clip(
    directory: str, saved: dict, config: PublishSettings, staging: Path, images: list
) -> tuple[card.CardInputs, float]:
    import open_clip
    from safetensors.torch import save_file

    entry = ModelEntry(**saved["entry"])
    if entry.library != "open_clip":
        raise ModelError(f"{directory}: a {entry.library} model; publish takes open_clip models")
    model = load_model(entry, directory, config.device, config.tokenizer_dir)
    model_cfg = saved.get("model_cfg") or open_clip.get_model_config(entry.architecture)
    if not model_cfg:
        raise ModelError(f"{directory}: no model_cfg, and {entry.architecture} is not built in")
    preprocess_cfg = dict(model.module.visual.preprocess_cfg)
    published = {"model_cfg": model_cfg, "preprocess_cfg": preprocess_cfg}
    nested = trained_nested_dims(saved)
    if nested:  # evaluate reports recall@K per prefix (open_clip reads only the two above)
        published["nested_dims"] = list(nested)
    (staging / OPEN_CLIP_CONFIG).write_text(json.dumps(published, indent=2))
    state = {k: v.detach().cpu().contiguous() for k, v in model.module.state_dict().items()}
    save_file(state, str(staging / OPEN_CLIP_WEIGHTS))
    _tokenizer_files(model_cfg, config, staging)
    if entry.hub_tokenizer and not model.tokenizer_dir:
        model.tokenizer_dir = str(staging)
    difference = _reload_difference(model, staging, images, config.device)
    inputs = _card_inputs("open_clip", entry, saved, state, preprocess=preprocess_cfg)
    return inputs, difference


@torch.no_grad()
def _reload_difference(model: LoadedModel, staging: Path, images: list, device: str) -> float:
    """The largest difference between the checkpoint's embeddings and those of the
    published folder loaded by open_clip itself (images, and texts for text models)."""
    import open_clip

    source = f"local-dir:{staging}"
    published, _, preprocess = open_clip.create_model_and_transforms(source, device=device)
    published.eval()
    expected = model.encode_images(torch.stack([model.transform(i) for i in images]).to(device))
    got = published.encode_image(torch.stack([preprocess(i) for i in images]).to(device))
    differences = [(expected - got).abs().max().item()]
    if model.entry.text:
        tokens = open_clip.get_tokenizer(source)(CHECK_TEXTS).to(device)
        expected = model.encode_texts(CHECK_TEXTS)
        differences.append((expected - published.encode_text(tokens)).abs().max().item())
    return max(differences)


def _stage_head(
    directory: str, saved: dict, config: PublishSettings, staging: Path, images: list
) -> tuple[card.CardInputs, float]:
    staged = head_form.stage_head(directory, config.device, config.tokenizer_dir, staging, images)
    card_inputs = _card_inputs(
        "head",
        staged.backbone,
        saved,
        staged.state,
        head=staged.head,
        backbone_weights=_backbone_weights(backbone_of(saved), staged.backbone),
        normalize_input=staged.normalize_input,
        preprocess=staged.preprocess,
    )
    return card_inputs, staged.difference


def _stage_finetuned_towers(
    directory: str, saved: dict, config: PublishSettings, staging: Path, images: list
) -> tuple[card.CardInputs, float]:
    """A fine-tuned image tower in open_clip's layout (as a fine-tune publishes), the
    signal tower in ``signal_encoder/``."""
    with tempfile.TemporaryDirectory(prefix="embedpipe-image-tower-") as folder:
        finetuned = two_towers_form.write_finetuned_checkpoint(directory, saved, folder)
        inputs, image_difference = _stage_open_clip(folder, finetuned, config, staging, images)
    signal = two_towers_form.stage_signal_tower(directory, staging, OPEN_CLIP_CONFIG, config.device)
    signal_parameters, signal_bytes = _size(signal.state)
    inputs.kind, inputs.image_form = IMAGE_SIGNAL_KIND, "open_clip"
    for dtype, size in signal_bytes.items():
        inputs.bytes_by_dtype[dtype] = inputs.bytes_by_dtype.get(dtype, 0) + size
    inputs.training = _training_settings(saved)
    inputs.signal = {
        **signal.record,
        "entry": signal.entry.model_dump(mode="json"),
        "parameters": signal_parameters,
    }
    inputs.parameters += signal_parameters
    return inputs, two_towers_form.worst(image_difference, signal.difference)


def _stage_two_towers(
    directory: str, saved: dict, config: PublishSettings, staging: Path, images: list
) -> tuple[card.CardInputs, float]:
    if image_mode(saved, directory) == FINETUNE_MODE:
        return _stage_finetuned_towers(directory, saved, config, staging, images)
    staged = two_towers_form.stage_two_towers(
        directory, config.device, config.tokenizer_dir, staging, images
    )
    image = staged.image
    signal_parameters, _ = _size(staged.signal_state)
    card_inputs = _card_inputs(
        IMAGE_SIGNAL_KIND,
        image.backbone,
        saved,
        {**image.state, **{f"signal.{k}": v for k, v in staged.signal_state.items()}},
        head=image.head,
        backbone_weights=_backbone_weights(image_tower_record(saved, directory), image.backbone),
        normalize_input=image.normalize_input,
        preprocess=image.preprocess,
        signal={
            **staged.signal,
            "entry": staged.signal_entry.model_dump(mode="json"),
            "parameters": signal_parameters,
        },
    )
    return card_inputs, staged.difference


def _backbone_weights(described: dict[str, Any], entry: ModelEntry) -> str:
    """What the card says of the weights a head's backbone embedded with: a tag or hub id
    as it is, never a local path or a bucket (meaningless to a reader, maybe private)."""
    weights = described["weights"] or entry.pretrained
    if weights == RANDOM_WEIGHTS:
        return f"{RANDOM_WEIGHTS} (seed {described['seed']})"
    if storage.is_s3(weights) or os.path.isabs(weights) or os.path.exists(weights):
        return f"a checkpoint named {os.path.basename(os.path.normpath(weights))}"
    return weights


def _refuse_non_finite_weights(directory: str, checkpoint_uri: str) -> None:
    """A checkpoint with NaN or infinite weights (a diverged training) is named as such,
    not as a mismatch between the published model and the checkpoint."""
    from safetensors.torch import load_file

    from embedpipe.core.finite import NonFiniteError, first_nonfinite_tensor
    from embedpipe.models.backends.base import WEIGHTS_NAME

    broken = first_nonfinite_tensor(load_file(os.path.join(directory, WEIGHTS_NAME)))
    if broken is not None:
        raise NonFiniteError(
            f"{checkpoint_uri}/{WEIGHTS_NAME}: weight {broken} holds NaN or infinity (a "
            "diverged training?); nothing was written"
        )


@outputs.writes_output(inputs=("checkpoint_uri", "check_images_uri"))
def publish_checkpoint(
    checkpoint_uri: str,
    out_uri: str,
    config: PublishSettings,
    metrics_uri: str = "",
    lineage_uris: tuple[str, ...] | list[str] = (),
    check_images_uri: str = "",
) -> PublishResult:
    started = time.perf_counter()
    token = hub.hub_token(config) if config.push else ""  # before anything is read or sent
    directory = fetch_weights(checkpoint_uri)
    if not os.path.isdir(directory):
        raise FileNotFoundError(f"{checkpoint_uri}: no checkpoint folder here")
    saved = _read_checkpoint_config(directory, checkpoint_uri)
    identity = _identity(directory, checkpoint_uri)
    metrics = card.read_metrics(metrics_uri, identity) if metrics_uri else []
    lineage = [card.read_lineage(uri) for uri in lineage_uris]
    out_uri = storage.normalize(out_uri)
    previous = destination.check_destination(out_uri, identity)
    images = _check_images(config.check_count, check_images_uri)
    with tempfile.TemporaryDirectory(prefix="embedpipe-publish-") as folder:
        staging = Path(folder)
        if is_head_config(saved):
            inputs, difference = _stage_head(directory, saved, config, staging, images)
            config_name = CONFIG_NAME
        elif is_two_towers_config(saved):
            inputs, difference = _stage_two_towers(directory, saved, config, staging, images)
            config_name = CONFIG_NAME if inputs.image_form == "head" else OPEN_CLIP_CONFIG
        else:
            inputs, difference = _stage_open_clip(directory, saved, config, staging, images)
            config_name = OPEN_CLIP_CONFIG
        if not difference <= config.check_tolerance:  # NaN fails too
            _refuse_non_finite_weights(directory, checkpoint_uri)
            raise RuntimeError(
                f"{checkpoint_uri}: the published model's outputs differ from the checkpoint's "
                f"by {difference:.3g} (check_tolerance {config.check_tolerance:g}); "
                "nothing was written"
            )
        inputs.name = config.name or config.push.rsplit("/", 1)[-1] or inputs.entry["name"]
        if inputs.kind == "head" and not config.name and not config.push:
            inputs.name = f"{inputs.entry['name']}-head"
        if inputs.kind == IMAGE_SIGNAL_KIND and not config.name and not config.push:
            inputs.name = f"{inputs.entry['name']}-{inputs.signal['entry']['name']}"
        inputs.repo_id, inputs.metrics, inputs.lineage = config.push, metrics, lineage
        (staging / CARD_NAME).write_text(card.render_card(inputs, config), encoding="utf-8")
        for leftover in CHECKPOINT_ONLY:
            (staging / leftover).unlink(missing_ok=True)
        files = destination.record_publish(staging, config_name, identity)
        destination.move_in(staging, out_uri, config_name, previous)
        # One commit of the whole folder: a retried push leaves the same files, once.
        pushed = hub.push_folder(str(staging), config, token) if config.push else ""
    result = PublishResult(
        out_uri=out_uri,
        kind=inputs.kind,
        files=files,
        parameters=inputs.parameters,
        max_difference=difference,
        pushed=pushed,
        seconds=round(time.perf_counter() - started, 3),
    )
    log.info("published %s (%s) to %s", inputs.name, inputs.kind, out_uri)
    return result
