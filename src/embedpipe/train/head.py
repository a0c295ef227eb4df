"""head: an MLP projection head trained on frozen embeddings of any registry model.

The embeddings come from an ``embed`` output; the head checkpoint names the backbone
entry and weights that made them, so ``embedpipe embed --weights HEAD_CKPT`` runs the
backbone and then the head (see ``embedpipe.models.loading``).
"""

from __future__ import annotations

from collections.abc import Iterator
from functools import partial

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from embedpipe.config import ConfigError, TrainSettings
from embedpipe.core import datasets
from embedpipe.core.finite import check_embeddings
from embedpipe.core.schemas import EMBEDDINGS_KIND
from embedpipe.core.seeding import derived_seed
from embedpipe.models.heads import HEAD_KIND, ProjectionHead, backbone_record
from embedpipe.models.registry import ModelEntry
from embedpipe.train import losses
from embedpipe.train.data import Examples, positive_for, rows_by_concept
from embedpipe.train.finetune import init_scale
from embedpipe.train.nested import nested_loss, prefix_recalls
from embedpipe.train.optim import param_groups
from embedpipe.train.sampling import BandBandit, MinedNegatives, triplet_negatives
from embedpipe.train.task import TaskDefaults
from embedpipe.train.validation import image_recall, validation_rows

__all__ = ["HeadModule", "HeadTask", "ProjectionHead", "load_embeddings"]


class HeadModule(nn.Module):
    """The head on standardised inputs, with a learnable logit scale and bias; the module
    DDP wraps.

    Frozen embeddings of an untrained or generic backbone sit in a narrow cone (the demo's
    random ViT: mean cosine 0.88), so their differences are tiny next to the head's
    initial weights and the head barely moves them. Centring on the training mean and
    scaling to unit variance per dimension (one scale for all, so cosine geometry is kept)
    fixes that; the affine map is folded into the first layer when saved."""

    def __init__(
        self,
        head: ProjectionHead,
        init_scale: float,
        init_bias: float | None,
        shift: torch.Tensor,
        spread: float,
    ):
        super().__init__()
        self.head = head
        self.logit_scale = nn.Parameter(torch.full([], init_scale))
        self.logit_bias = None if init_bias is None else nn.Parameter(torch.full([], init_bias))
        self.register_buffer("shift", shift.float().clone())
        self.register_buffer("spread", torch.full([], float(spread)))

    def project(self, features: torch.Tensor) -> torch.Tensor:
        return self.head((features - self.shift) / self.spread)

    def forward(self, first: torch.Tensor, second: torch.Tensor, third: torch.Tensor | None):
        # One pass over every view keeps DDP's single-forward bookkeeping simple.
        views = [first, second] if third is None else [first, second, third]
        out = F.normalize(self.project(torch.cat(views)), dim=-1).split(len(first))
        negative = out[2] if third is not None else None
        return out[0], out[1], negative, self.logit_scale.exp(), self.logit_bias

    def folded_head(self) -> dict[str, torch.Tensor]:
        """The head's weights with the standardisation folded into its first layer, so the
        saved head takes the raw embeddings: W((x - m) / s) + b = (W / s) x + b - W m / s."""
        state = {k: v.detach().clone() for k, v in self.head.state_dict().items()}
        first = next(name for name in state if name.endswith(".weight"))
        bias = first.removesuffix("weight") + "bias"
        weight = state[first].float() / self.spread
        state[bias] = (state[bias].float() - weight @ self.shift.float()).to(state[bias].dtype)
        state[first] = weight.to(state[first].dtype)
        return state


def standardization(matrix: np.ndarray, rows: np.ndarray) -> tuple[torch.Tensor, float]:
    """Training rows' mean, and the root mean square of their centred coordinates."""
    train = torch.from_numpy(matrix[rows]).double()
    shift = train.mean(0)
    spread = float((train - shift).pow(2).mean().sqrt())
    return shift.float(), spread if spread > 0 else 1.0


def identity_init(head: ProjectionHead) -> None:
    """Make the head compute its input exactly: one layer is the identity matrix; deeper
    heads route x and -x through the activation, as gelu(x) - gelu(-x) = x (and relu)."""
    layers = [m for m in head.layers if isinstance(m, nn.Linear)]
    dim = head.config["in_dim"]
    eye = torch.eye(dim)
    with torch.no_grad():
        for index, layer in enumerate(layers):
            layer.weight.zero_()
            layer.bias.zero_()
            if len(layers) == 1:
                layer.weight.copy_(eye)
            elif index == 0:
                layer.weight[:dim] = eye
                layer.weight[dim : 2 * dim] = -eye
            elif index == len(layers) - 1:
                layer.weight[:, :dim] = eye
                layer.weight[:, dim : 2 * dim] = -eye
            else:
                block = torch.cat([torch.cat([eye, -eye], 1), torch.cat([-eye, eye], 1)])
                layer.weight[: 2 * dim, : 2 * dim] = block


def check_identity(config: TrainSettings, in_dim: int) -> None:
    out_dim = config.out_dim or in_dim
    if out_dim != in_dim:
        raise ConfigError(
            f"head_init: identity needs out_dim equal to the embedding size {in_dim} "
            f"(out_dim is {out_dim})"
        )
    if config.depth > 1 and config.width < 2 * in_dim:
        raise ConfigError(
            f"head_init: identity with depth {config.depth} needs width >= {2 * in_dim} "
            f"(twice the embedding size; width is {config.width})"
        )


def embeddings_backbone(entry: ModelEntry, manifest: dict) -> dict:
    """The backbone record of a head trained on the embeddings whose manifest this is."""
    return backbone_record(
        entry,
        manifest.get("weights", ""),
        int(manifest.get("seed", 0)),
        bool(manifest.get("normalized", True)),
    )


def load_embeddings(embeddings_uri: str, examples: Examples) -> tuple[np.ndarray, np.ndarray, dict]:
    """The embedding of each example row (zeros where none) and which rows have one."""
    manifest = datasets.read_manifest(embeddings_uri, EMBEDDINGS_KIND)
    table = datasets.read_table(embeddings_uri, EMBEDDINGS_KIND, ["image_id", "embedding"])
    dim = table.schema.field("embedding").type.list_size
    vectors = table.column("embedding").combine_chunks().flatten().to_numpy()
    vectors = vectors.reshape(-1, dim).astype(np.float32)
    check_embeddings(vectors, manifest.get("model", "(unnamed)"), embeddings_uri)
    matrix = np.zeros((len(examples.image_ids), dim), dtype=np.float32)
    present = np.zeros(len(examples.image_ids), dtype=bool)
    for position, image_id in enumerate(table.column("image_id").to_pylist()):
        row = examples.index.get(image_id)
        if row is not None:
            matrix[row] = vectors[position]
            present[row] = True
    if not present[examples.split == "train"].any():
        raise ConfigError(
            f"embeddings: {embeddings_uri} has no vector for any training image "
            "(embed the same images dataset first)"
        )
    return matrix, present, manifest


class HeadTask(TaskDefaults):
    """Batches of embedding rows: anchor, positive (another image of the concept) and,
    for a loss that needs negatives (``triplet``), a negative from the band the bandit picks."""

    def __init__(
        self,
        entry: ModelEntry,
        config: TrainSettings,
        examples: Examples,
        embeddings_uri: str,
        device: torch.device,
        loss_options: dict,
        mined: MinedNegatives | None,
    ):
        self.entry, self.config, self.examples, self.device = entry, config, examples, device
        matrix, present, manifest = load_embeddings(embeddings_uri, examples)
        if manifest.get("model") and manifest["model"] != entry.name:
            raise ConfigError(
                f"model: {embeddings_uri} holds embeddings of {manifest['model']}, "
                f"not of {entry.name}"
            )
        examples.split = np.where(present, examples.split, "unused")
        self.embeddings_uri = embeddings_uri
        self.manifest = manifest
        self.matrix = torch.from_numpy(matrix)
        in_dim = matrix.shape[1]
        if config.head_init == "identity":
            check_identity(config, in_dim)
        self.train_rows = examples.rows("train")
        if config.standardize:
            shift, spread = standardization(matrix, self.train_rows)
        else:
            shift, spread = torch.zeros(in_dim), 1.0
        torch.manual_seed(config.seed)
        self.head = ProjectionHead(in_dim, config.depth, config.width, config.out_dim or in_dim)
        if config.head_init == "identity":
            identity_init(self.head)
        self.module = HeadModule(
            self.head, init_scale(config.loss), losses.init_logit_bias(config.loss), shift, spread
        ).to(device)
        self.same_concept = rows_by_concept(examples, self.train_rows)
        self.queries, self.candidates = validation_rows(examples)
        self.loss = nested_loss(
            losses.get_loss(config.loss, **loss_options),
            config.nested_dims,
            self.head.config["out_dim"],
        )
        self.mined = mined
        self.bandit = None
        self.needs_negatives = losses.needs_negatives(config.loss)
        if self.needs_negatives and mined and mined.band_names:
            self.bandit = BandBandit(mined.band_names, config.exploration)
        self.step = 0
        self.pending_reward: tuple[int, torch.Tensor] | None = None

    def param_groups(self) -> list[dict]:
        new = {name for name, _ in self.module.named_parameters()}
        return param_groups(self.module, new, self.config)

    def batches(self, epoch: int, micro_batches: list[list[int]]) -> Iterator:
        config, examples = self.config, self.examples
        for rows in micro_batches:
            positives = [
                positive_for(examples, row, self.same_concept, config.seed, epoch) for row in rows
            ]
            batch = {
                "rows": torch.tensor(rows),
                "first": self.matrix[rows].to(self.device),
                "second": self.matrix[positives].to(self.device),
                "third": None,
                "arm": None,
            }
            if self.needs_negatives:
                arm = self.bandit.choose() if self.bandit else None
                band = self.bandit.bands[arm] if self.bandit else None
                negatives = triplet_negatives(
                    rows,
                    band,
                    self.mined,
                    examples,
                    self.train_rows,
                    config.seed,
                    self._draw(epoch, rows),
                )
                batch["third"] = self.matrix[negatives].to(self.device)
                batch["arm"] = arm
            yield batch

    @staticmethod
    def _draw(epoch: int, rows: list[int]) -> int:
        return derived_seed(epoch, *map(str, rows[:4]))

    def features_of(self, forward: nn.Module, batch: dict) -> tuple:
        return forward(batch["first"], batch["second"], batch["third"])

    def loss_from(self, features: tuple, batch: dict) -> torch.Tensor:
        first, second, negative, scale, bias = features
        labels = torch.from_numpy(self.examples.labels[batch["rows"].numpy()]).to(self.device)
        loss = self.loss(first, second, scale, bias, labels=labels, negative_features=negative)
        if batch["arm"] is not None:
            with torch.no_grad():
                hinge = F.relu(
                    (first - second).norm(dim=1)
                    - (first - negative).norm(dim=1)
                    + self.config.margin
                ).mean()
            self.pending_reward = (batch["arm"], hinge)
        return loss

    def after_step(self, reduce) -> dict:
        """Feed the bandit the (all-reduced) violation of the band it picked."""
        pending = self.pending_reward
        if self.bandit is None or pending is None:
            return {}
        arm, hinge = pending
        reward = float(reduce(hinge.detach()))
        self.bandit.update(arm, reward)
        self.pending_reward = None
        return {"band": self.bandit.bands[arm], "band_reward": reward}

    def flops_per_sample(self, batch: dict) -> float:
        params = sum(p.numel() for p in self.head.parameters())
        views = 3 if batch["third"] is not None else 2
        return 6.0 * params * views

    @torch.no_grad()
    def evaluate(self, autocast) -> dict[str, float]:
        if not len(self.queries):
            return {}
        vectors = self.matrix[self.candidates].to(self.device)
        with autocast():  # low-precision weights take the fp32 embeddings as training does
            projected = self.module.project(vectors)
        projected = F.normalize(projected.float(), dim=-1).cpu()
        recall = partial(
            image_recall, self.examples, self.queries, self.candidates, ks=self.config.val_k
        )
        return recall(projected) | prefix_recalls(recall, projected, self.config.nested_dims)

    def weights(self) -> dict[str, torch.Tensor]:
        return self.module.folded_head()

    def training_weights(self) -> dict[str, torch.Tensor]:
        return self.module.state_dict()

    def load_training_weights(self, state: dict[str, torch.Tensor]) -> None:
        self.module.load_state_dict(state, strict=True)

    def extra_state(self) -> dict:
        return {"bandit": self.bandit.state()} if self.bandit else {}

    def load_extra_state(self, state: dict) -> None:
        if self.bandit and "bandit" in state:
            self.bandit.pulls = list(state["bandit"]["pulls"])
            self.bandit.reward_sums = list(state["bandit"]["reward_sums"])

    def summary(self) -> dict:
        return {"bandit": self.bandit.summary()} if self.bandit else {}

    def checkpoint_config(self) -> dict:
        return {
            "kind": HEAD_KIND,
            "backbone": embeddings_backbone(self.entry, self.manifest),
            "head": self.head.config,
            "embeddings": self.embeddings_uri,
        }
