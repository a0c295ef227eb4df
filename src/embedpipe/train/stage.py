"""The train stage's entry point: artifacts in, a trained model (checkpoint folder) out.

Everything that can be checked before a model is built is checked first (the mode and
loss against the data given, labels, an empty training split, a model without a text
tower, a checkpoint of another architecture), each as an error naming the setting.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from dataclasses import dataclass, field

import torch

from embedpipe.config import ConfigError, TrainSettings
from embedpipe.core import outputs, storage
from embedpipe.core.results import StageMetrics
from embedpipe.models.registry import ModelEntry
from embedpipe.train import checkpoint as ckpt
from embedpipe.train import losses
from embedpipe.train.data import load_examples
from embedpipe.train.distributed import World, is_main_process, setup, teardown
from embedpipe.train.inputs import TrainInputs
from embedpipe.train.loop import Loop, history_curves, resumable
from embedpipe.train.run_identity import check_training_output, input_identities
from embedpipe.train.sampling import load_negatives
from embedpipe.train.validation import skip_meaningless_validation

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class TrainResult(StageMetrics):
    out_uri: str
    mode: str
    loss: str
    steps: int
    resumed_from_step: int
    best_metric: str
    best_value: float | None  # None: no validation ran (see skipped)
    best_step: int
    untrained_value: float | None
    final_loss: float
    samples_per_s: float
    mfu: float
    seconds: float
    skipped: dict[str, str] = field(default_factory=dict)  # what was not measured, and why


def loss_options(config: TrainSettings, world: World) -> dict:
    known = losses.loss_options(config.loss)
    options = {
        "rank": world.rank,
        "world_size": world.size,
        "gather_with_grad": True,
        "pos_weight": config.pos_weight,
        "margin": config.margin,
    }
    return {key: value for key, value in options.items() if key in known}


def check_inputs(
    config: TrainSettings,
    entry: ModelEntry,
    embeddings_uri: str | None,
    negatives_uri: str | None,
) -> None:
    if config.mode == "head" and not embeddings_uri:
        raise ConfigError(
            "mode: head trains on frozen embeddings; give --embeddings (embed's output)"
        )
    if config.mode == "finetune":
        from embedpipe.train.finetune import check_model

        check_model(entry, config)
    if losses.needs_negatives(config.loss) and config.mode == "head" and not negatives_uri:
        log.info("triplet without --negatives: negatives are random images of other concepts")


@outputs.writes_output(inputs=TrainInputs.parameters(), writer=is_main_process)
def train_model(
    images_uri: str,
    out_uri: str,
    config: TrainSettings,
    entry: ModelEntry,
    splits_uri: str | None = None,
    negatives_uri: str | None = None,
    embeddings_uri: str | None = None,
    captions_uri: str | None = None,
    on_validation: Callable[[int, dict[str, float]], None] | None = None,
    models: dict | None = None,
) -> TrainResult:
    """Train (or resume training) and write the model to ``out_uri``.

    ``on_validation(step, metrics)`` is called after each validation (tuning's pruner).
    ``models``: the config file's ``[models.NAME]`` entries (an image_signal training's
    ``signal_model`` may be one).
    The writing process (rank 0) holds the output's lock, so a second training of the
    same output stops instead of mixing its checkpoints with this one's."""
    started = time.perf_counter()
    out_uri = storage.normalize(out_uri)
    check_inputs(config, entry, embeddings_uri, negatives_uri)
    identities = input_identities(
        dict(
            images_uri=images_uri,
            splits_uri=splits_uri,
            negatives_uri=negatives_uri,
            embeddings_uri=embeddings_uri,
            captions_uri=captions_uri,
        )
    )
    check_training_output(out_uri, config.model_dump(mode="json"), identities)
    examples = load_examples(images_uri, config, splits_uri, captions_uri)
    if losses.needs_labels(config.loss) and (examples.labels[examples.rows("train")] < 0).any():
        raise ConfigError(f"labels: some training images have no {config.labels} label")
    mined = load_negatives(negatives_uri, examples) if negatives_uri else None
    world, device = setup(config.device)
    try:
        torch.manual_seed(config.seed)
        options = loss_options(config, world)
        if config.pairs == "image_signal" and config.mode == "finetune":
            from embedpipe.train.signal_finetune import ImageSignalFinetuneTask

            task = ImageSignalFinetuneTask(
                entry, config, examples, images_uri, device, options, models=models
            )
        elif config.pairs == "image_signal":
            from embedpipe.train.pairs_signal import ImageSignalTask

            task = ImageSignalTask(
                entry, config, examples, images_uri, embeddings_uri, device, options, models
            )
        elif config.mode == "head":
            from embedpipe.train.head import HeadTask

            task = HeadTask(entry, config, examples, embeddings_uri, device, options, mined)
        else:
            from embedpipe.train.finetune import FinetuneTask

            task = FinetuneTask(entry, config, examples, images_uri, device, options)
        skipped = skip_meaningless_validation(task, config)
        settings_json = config.model_dump(mode="json")
        loop = Loop(task, config, out_uri, world, device, mined, settings_json)
        loop.on_validation = on_validation
        loop.inputs = identities
        found = resumable(out_uri, settings_json, world.size, identities)
        if found:
            loop.restore(*found)
            log.info("resuming %s from step %d", out_uri, loop.state.step)
        loop.run()
        result = _finish(loop, task, config, out_uri, entry, started, skipped)
    finally:
        teardown()
    return result


def _finish(loop: Loop, task, config, out_uri, entry, started, skipped=None) -> TrainResult:
    state = loop.state
    last = [r for r in state.history if "loss" in r]
    speeds = [r["samples_per_s"] for r in last if "samples_per_s" in r]
    mfus = [r["mfu"] for r in last if "mfu" in r]
    result = TrainResult(
        out_uri=out_uri,
        mode=config.mode,
        loss=config.loss,
        steps=state.step,
        resumed_from_step=state.resumed_from,
        best_metric=config.best_metric,
        best_value=float(state.best) if state.best is not None else None,
        best_step=state.best_step,
        untrained_value=(
            float(state.initial[config.best_metric])
            if config.best_metric in state.initial
            else None
        ),
        final_loss=float(last[-1]["loss"]) if last else 0.0,
        samples_per_s=round(sum(speeds) / len(speeds), 3) if speeds else 0.0,
        mfu=round(sum(mfus) / len(mfus), 4) if mfus else 0.0,
        seconds=round(time.perf_counter() - started, 3),
        skipped=dict(skipped or {}),
    )
    if not loop.world.is_main:
        return result
    # The model at OUT: the best by the metric where validation ran, else the last.
    best = ckpt.complete_checkpoints(out_uri, "best")
    source = best[-1][1] if best else ckpt.complete_checkpoints(out_uri, "last")[-1][1]
    ckpt.copy_model(source, out_uri)
    ckpt.write_metrics(
        out_uri,
        {
            "result": {k: v for k, v in result.__dict__.items()},
            "model": entry.name,
            "source": source,
            "untrained": state.initial,
            "history": state.history,
            "curves": history_curves(state.history),
            **task.summary(),
        },
    )
    log.info("trained %s: %d steps, %s", entry.name, state.step, result.metrics())
    return result
