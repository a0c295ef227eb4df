"""image_signal: two towers trained together on each image and its own signal.

The image tower is a projection head on frozen image embeddings (``--embeddings``, as in
``train.head``); the signal tower is a registry signal encoder (``[train].signal_model``)
trained from its start weights. Both map into the signal encoder's embedding size, and a
contrastive loss across the two (infonce, the sigmoid losses) pulls each image towards its
own signal. Validation: held-out image -> signal recall@K (``val_recall_at_K``), each
held-out image against the signals of every held-out image (held-out objects, as the
splits hold out concepts), a hit when one of the K nearest is a signal of the query's
concept: its own, or another view's of the same object (the reverse direction as
``val_signal_to_image_recall_at_K``).
"""

from __future__ import annotations

from collections.abc import Iterator

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import torch
import torch.nn.functional as F
from torch import nn

from embedpipe.config import ConfigError, TrainSettings
from embedpipe.core import datasets, storage
from embedpipe.core.schemas import IMAGES_KIND
from embedpipe.embed.signals import SignalRows, check_signal_column, padded_batch
from embedpipe.models.heads import ProjectionHead
from embedpipe.models.registry import ModelEntry, ModelError, get_entry
from embedpipe.models.signal_encoders import SignalEncoder, build_signal_encoder
from embedpipe.train import losses
from embedpipe.train.data import Examples
from embedpipe.train.finetune import init_scale
from embedpipe.train.head import embeddings_backbone, load_embeddings, standardization
from embedpipe.train.nested import OVERALL_RECALL, prefix
from embedpipe.train.optim import param_groups
from embedpipe.train.task import TaskDefaults

IMAGE_SIGNAL_KIND = "image_signal"


class ImageSignalModule(nn.Module):
    """The image head (on standardised frozen embeddings), the signal encoder, and the
    loss's learnable logit scale and bias; the module DDP wraps."""

    def __init__(
        self,
        head: ProjectionHead,
        encoder: SignalEncoder,
        init_scale: float,
        init_bias: float | None,
        shift: torch.Tensor,
        spread: float,
    ):
        super().__init__()
        self.head, self.encoder = head, encoder
        self.logit_scale = nn.Parameter(torch.full([], init_scale))
        self.logit_bias = None if init_bias is None else nn.Parameter(torch.full([], init_bias))
        self.register_buffer("shift", shift.float().clone())
        self.register_buffer("spread", torch.full([], float(spread)))

    def image(self, vectors: torch.Tensor) -> torch.Tensor:
        return F.normalize(self.head((vectors - self.shift) / self.spread).float(), dim=-1)

    def signal(self, values: torch.Tensor, lengths: torch.Tensor) -> torch.Tensor:
        return F.normalize(self.encoder(values, lengths).float(), dim=-1)

    def forward(self, vectors: torch.Tensor, values: torch.Tensor, lengths: torch.Tensor):
        return (
            self.image(vectors),
            self.signal(values, lengths),
            None,
            self.logit_scale.exp(),
            self.logit_bias,
        )

    def folded_head(self) -> dict[str, torch.Tensor]:
        """The head with its input standardisation folded into the first layer."""
        state = {k: v.detach().clone() for k, v in self.head.state_dict().items()}
        first = next(name for name in state if name.endswith(".weight"))
        bias = first.removesuffix("weight") + "bias"
        weight = state[first].float() / self.spread
        state[bias] = (state[bias].float() - weight @ self.shift).to(state[bias].dtype)
        state[first] = weight.to(state[first].dtype)
        return state


def load_signals(images_uri: str, column: str, examples: Examples) -> SignalRows:
    """The ``column`` signal of each example row, in example order."""
    manifest = datasets.verify_dataset(images_uri, IMAGES_KIND)
    shards = datasets.shard_uris(images_uri, manifest)
    if shards:
        fs, path = storage.arrow_filesystem(shards[0])
        check_signal_column(images_uri, pq.read_schema(path, filesystem=fs), column)
    full = datasets.read_table(images_uri, IMAGES_KIND, ["image_id", column])
    ids = full.column("image_id").to_pylist()
    first = {}
    for position, image_id in enumerate(ids):
        first.setdefault(image_id, position)
    order = [first.get(image_id, -1) for image_id in examples.image_ids]
    picked = pa.array([max(p, 0) for p in order], type=pa.int64())
    column_values = full.column(column).combine_chunks().take(picked)
    rows = SignalRows.from_arrow(column_values)
    missing = np.array([p < 0 for p in order], dtype=bool)
    return SignalRows(rows.values, rows.starts, rows.lengths, rows.present & ~missing)


def usable_signals(rows: SignalRows, encoder: SignalEncoder) -> np.ndarray:
    """Rows whose signal the encoder can take: present, finite, of an accepted length."""
    fixed, shortest = encoder.arch.signal_length, encoder.arch.min_signal_length
    usable = rows.present & (rows.lengths >= max(shortest, 1))
    if fixed:
        usable &= rows.lengths == fixed
    for row in np.flatnonzero(usable):
        usable[row] = bool(np.isfinite(rows.signal(row)).all())
    return usable


def build_encoder(
    config: TrainSettings, models: dict | None, embed_dim: int = 0
) -> tuple[ModelEntry, SignalEncoder]:
    """The signal encoder and its entry; from random weights with ``embed_dim`` (when
    given), its output projection is sized to that instead of the entry's."""
    try:
        entry = get_entry(config.signal_model, models)
    except ModelError as error:
        raise ConfigError(f"signal_model: {error}") from None
    if not entry.signal:
        raise ConfigError(
            f"signal_model: {entry.name} is not a signal encoder (library {entry.library})"
        )
    torch.manual_seed(config.seed)
    if config.signal_weights in ("", "random"):
        if embed_dim:
            entry = entry.model_copy(update={"embed_dim": embed_dim})
        return entry, build_signal_encoder(entry)
    from embedpipe.models.backends.signal import SignalBackend

    try:
        return entry, SignalBackend().load_checkpoint(entry, config.signal_weights)
    except ModelError as error:
        raise ConfigError(f"signal_weights: {error}") from None


def cross_modal_recall(
    image: torch.Tensor, signal: torch.Tensor, objects: np.ndarray, ks: tuple[int, ...], prefix: str
) -> dict[str, float]:
    """Row i of ``image`` and of ``signal`` come from one image, of object (concept)
    ``objects[i]``; recall@K both ways, a hit when one of the K nearest is of the query's
    object (its own signal or another view's)."""
    same = torch.from_numpy(objects[:, None] == objects[None, :])
    metrics = {}
    for name, queries, gallery in (
        ("recall", image, signal),
        ("signal_to_image_recall", signal, image),
    ):
        top = (queries @ gallery.T).topk(min(max(ks), len(gallery)), dim=1).indices
        matched = same.gather(1, top)
        for k in ks:
            metrics[f"{prefix}{name}_at_{k}"] = float(matched[:, :k].any(dim=1).float().mean())
    return metrics


def at_least_fp32(features: torch.Tensor) -> torch.Tensor:
    """bf16 features in float32 for the loss; float32 and float64 as they are."""
    return features if features.dtype in (torch.float32, torch.float64) else features.float()


def object_codes(examples: Examples, rows: np.ndarray) -> np.ndarray:
    """A number per row naming its object (its concept), as recall's positives need."""
    keys = examples.concept_keys()
    codes = {key: n for n, key in enumerate(sorted(set(keys)))}
    return np.array([codes[keys[row]] for row in rows.tolist()])


class SignalPairTask(TaskDefaults):
    """What both image_signal tasks share: the signals of the example rows, validation on
    held-out objects, the cross-modal loss and the signal tower's part of a checkpoint.
    A task sets ``module`` (``image``, ``signal``, ``encoder``, ``logit_scale``, ``logit_bias``)
    and ``loss``, and yields ``(rows, image inputs)`` from ``input_batches``."""

    nested_dims: tuple[int, ...] = ()  # prefixes validated besides the whole embedding

    def use_signals(self, images_uri: str, encoder: SignalEncoder, present=None) -> None:
        """Load the rows' signals; rows without a usable one (or not ``present``) take no
        part; the train and held-out rows follow."""
        config, examples = self.config, self.examples
        self.signals = load_signals(images_uri, config.signal_column, examples)
        usable = usable_signals(self.signals, encoder)
        if not usable[examples.split == "train"].any():
            raise ConfigError(
                f"signal_column: no training image of {images_uri} has a usable "
                f"'{config.signal_column}' signal for {self.signal_entry.name}"
            )
        if present is not None:
            usable &= present
        examples.split = np.where(usable, examples.split, "unused")
        self.train_rows = examples.rows("train")
        self.queries = examples.rows("val")
        self.candidates = self.queries

    def validation_problem(self) -> str:
        if len(self.queries) < 2:
            return "the splits hold fewer than two val rows with a signal to validate on"
        if max(self.config.val_k) > len(self.queries):
            return (
                f"val_k: {max(self.config.val_k)} is more than the {len(self.queries)} "
                "held-out signals"
            )
        return ""

    def loss_from(self, features: tuple, batch: dict) -> torch.Tensor:
        image, signal, _, scale, bias = features
        labels = torch.from_numpy(self.examples.labels[batch["rows"].numpy()]).to(self.device)
        return self.loss(
            at_least_fp32(image),
            at_least_fp32(signal),
            at_least_fp32(scale),
            bias,
            labels=labels,
            negative_features=None,
        )

    def input_batches(self, chunks: list[list[int]]) -> Iterator:
        raise NotImplementedError

    def image_inputs(self, rows: list[int]) -> torch.Tensor:
        """What ``module.image`` takes for ``rows``."""
        ((_, inputs),) = list(self.input_batches([rows]))
        return inputs

    @torch.no_grad()
    def embed_rows(self, rows: np.ndarray, autocast) -> tuple[torch.Tensor, torch.Tensor]:
        images, signals = [], []
        size = self.config.batch_size
        chunks = [rows[s : s + size].tolist() for s in range(0, len(rows), size)]
        for chunk_rows, inputs in self.input_batches(chunks):
            values, lengths = padded_batch(self.signals, chunk_rows.tolist())
            with autocast():
                images.append(self.module.image(inputs.to(self.device)).cpu())
                signals.append(
                    self.module.signal(values.to(self.device), lengths.to(self.device)).cpu()
                )
        return torch.cat(images).float(), torch.cat(signals).float()

    def evaluate(self, autocast) -> dict[str, float]:
        if not len(self.queries):
            return {}
        self.module.eval()
        try:
            image, signal = self.embed_rows(self.queries, autocast)
        finally:
            self.module.train()
        objects = object_codes(self.examples, self.queries)
        ks = self.config.val_k
        metrics = cross_modal_recall(image, signal, objects, ks, "val_")
        for dim in self.nested_dims:
            if dim < image.shape[1]:
                found = cross_modal_recall(
                    prefix(image, dim), prefix(signal, dim), objects, ks, "val_"
                )
                metrics |= {f"{k}_dim{dim}": v for k, v in found.items() if OVERALL_RECALL.match(k)}
        return metrics

    def signal_weights(self) -> dict[str, torch.Tensor]:
        """The signal tower's tensors (``signal.*``) and the learnt logit scale."""
        state = {
            f"signal.{k}": v.detach().clone() for k, v in self.module.encoder.state_dict().items()
        }
        state["logit_scale"] = self.module.logit_scale.detach().clone()
        return state

    def training_weights(self) -> dict[str, torch.Tensor]:
        return self.module.state_dict()

    def load_training_weights(self, state: dict[str, torch.Tensor]) -> None:
        self.module.load_state_dict(state, strict=True)

    def signal_record(self) -> dict:
        """The checkpoint's ``"signal"`` block: the encoder's whole entry, its start
        weights and the column it read."""
        return {
            "entry": self.signal_entry.model_dump(mode="json"),
            "weights": self.config.signal_weights,
            "column": self.config.signal_column,
        }


class ImageSignalTask(SignalPairTask):
    """Batches of example rows: each image's frozen embedding and its own signal."""

    def __init__(
        self,
        entry: ModelEntry,
        config: TrainSettings,
        examples: Examples,
        images_uri: str,
        embeddings_uri: str,
        device: torch.device,
        loss_options: dict,
        models: dict | None = None,
    ):
        self.entry, self.config, self.examples, self.device = entry, config, examples, device
        self.signal_entry, encoder = build_encoder(config, models)
        matrix, present, manifest = load_embeddings(embeddings_uri, examples)
        if manifest.get("model") and manifest["model"] != entry.name:
            raise ConfigError(
                f"model: {embeddings_uri} holds embeddings of {manifest['model']}, "
                f"not of {entry.name}"
            )
        self.use_signals(images_uri, encoder, present)
        self.embeddings_uri, self.manifest = embeddings_uri, manifest
        self.matrix = torch.from_numpy(matrix)
        in_dim, out_dim = matrix.shape[1], self.signal_entry.embed_dim
        if config.out_dim and config.out_dim != out_dim:
            raise ConfigError(
                f"out_dim: image_signal maps both towers to the signal encoder's "
                f"{out_dim} dims ({self.signal_entry.name}); leave out_dim 0"
            )
        if config.standardize:
            shift, spread = standardization(matrix, self.train_rows)
        else:
            shift, spread = torch.zeros(in_dim), 1.0
        torch.manual_seed(config.seed)
        self.head = ProjectionHead(in_dim, config.depth, config.width, out_dim)
        self.module = ImageSignalModule(
            self.head,
            encoder,
            init_scale(config.loss),
            losses.init_logit_bias(config.loss),
            shift,
            spread,
        ).to(device)
        self.loss = losses.get_loss(config.loss, **loss_options)

    def param_groups(self) -> list[dict]:
        new = {name for name, _ in self.module.named_parameters()}
        return param_groups(self.module, new, self.config)

    def batches(self, epoch: int, micro_batches: list[list[int]]) -> Iterator[dict]:
        for rows in micro_batches:
            values, lengths = padded_batch(self.signals, [int(r) for r in rows])
            yield {
                "rows": torch.tensor(rows),
                "first": self.matrix[rows].to(self.device),
                "values": values.to(self.device),
                "lengths": lengths.to(self.device),
            }

    def features_of(self, forward: nn.Module, batch: dict) -> tuple:
        return forward(batch["first"], batch["values"], batch["lengths"])

    def flops_per_sample(self, batch: dict) -> float:
        # each weight used once per sample: a lower bound for the signal encoder, which
        # applies its weights at every slice or position
        return 6.0 * sum(p.numel() for p in self.module.parameters())

    def input_batches(self, chunks: list[list[int]]) -> Iterator:
        """(rows, their frozen embeddings) per list of rows."""
        for rows in chunks:
            yield torch.tensor(rows), self.matrix[rows]

    def weights(self) -> dict[str, torch.Tensor]:
        state = {f"image_head.{k}": v for k, v in self.module.folded_head().items()}
        return state | self.signal_weights()

    def checkpoint_config(self) -> dict:
        return {
            "kind": IMAGE_SIGNAL_KIND,
            "image": {
                "backbone": embeddings_backbone(self.entry, self.manifest),
                "head": self.head.config,
                "embeddings": self.embeddings_uri,
            },
            "signal": self.signal_record(),
        }
