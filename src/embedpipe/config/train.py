"""Settings of the train stage: flat in ``[train]`` (the tune search space uses these names)."""

from __future__ import annotations

from typing import Any, Literal

from pydantic import Field, field_validator, model_validator

from embedpipe.config.base import COMPILE_TIME, COMPILE_TIME_FLAG, Section

# The same ranks as embedpipe.core.schemas.TAXONOMY_RANKS (config stays free of pyarrow).
TAXONOMY_RANKS = ("kingdom", "phylum", "class", "order", "family", "genus", "species")


class TrainSettings(Section):
    model: str = Field(
        "clip_vitb32",
        description="registry name of the model to fine-tune, or the backbone of a head",
        json_schema_extra=COMPILE_TIME_FLAG,
    )
    weights: str = Field(
        "", description='start weights: "" the registry\'s, "random", a dir or an s3:// prefix'
    )
    tokenizer_dir: str = Field("", description="local tokenizer for hub-tokenizer models")
    mode: Literal["finetune", "head"] = Field(
        "finetune",
        description="finetune: an open_clip model; head: an MLP on frozen embeddings",
    )
    pairs: Literal["image_text", "image_image", "image_signal"] = Field(
        "image_text",
        description="image-caption pairs, two images of one concept, or image_signal: each "
        "image with its own signal (signal_column), the image tower a head (mode head) or "
        "the open_clip image tower fine-tuned (mode finetune)",
    )
    signal_column: str = Field(
        "",
        description="image_signal: the images dataset's signal column to train on (one per "
        "training)",
    )
    signal_model: str = Field(
        "signal_transformer_small",
        description="image_signal: registry name of the signal encoder, trained jointly",
    )
    signal_weights: str = Field(
        "random",
        description='image_signal: signal encoder start weights: "random" (seeded) or a '
        "signal encoder checkpoint directory",
    )
    # The names of embedpipe.train.losses' registry (a test holds the two together).
    loss: Literal[
        "infonce", "pairwise_sigmoid", "pairwise_sigmoid_upwtdpos", "multipos_sigmoid", "triplet"
    ] = Field("infonce", description="contrastive loss (embedpipe.train.losses)")
    pos_weight: float = Field(
        1.0, gt=0, description="weight of positive pairs (upwtdpos, multipos_sigmoid)"
    )
    margin: float = Field(0.2, gt=0, description="triplet margin")
    labels: Literal["concept", *TAXONOMY_RANKS] = Field(  # type: ignore[valid-type]
        "concept",
        description="labels of multipos_sigmoid: concept, or a taxonomy rank (needs --captions)",
    )
    templates: tuple[str, ...] = Field(
        ("a photo of a {concept} {category}.",),
        description="captions where the taxonomy has none; {concept}, {category} filled in",
    )
    lr: float = Field(1e-4, gt=0, description="peak learning rate of new parameters")
    tower_lr: float = Field(
        0.0, ge=0, description="peak learning rate of the pretrained towers (0: lr)"
    )
    weight_decay: float = Field(0.1, ge=0, description="AdamW weight decay (not on gains/biases)")
    batch_size: int = Field(
        32, gt=0, description="contrastive batch per device: the samples each loss compares"
    )
    micro_batch: int = Field(
        0,
        ge=0,
        description="samples that go through the model with gradients at once, by gradient "
        "caching; the loss still sees the whole batch_size (0: off, all at once)",
    )
    accumulation: int = Field(
        1,
        gt=0,
        description="whole contrastive batches summed per optimizer step (plain gradient "
        "accumulation: adds no negatives; for a larger contrastive batch use micro_batch)",
    )
    nested_dims: tuple[int, ...] = Field(
        (),
        description="Matryoshka: embedding prefixes also trained (the loss summed over them "
        'and the full dimension), e.g. [32, 64, 128] or "32,64,128" (empty: off)',
    )
    warmup_steps: int = Field(0, ge=0, description="linear warm-up steps, then cosine decay")
    steps: int = Field(0, ge=0, description="optimizer steps (0: from epochs)")
    epochs: int = Field(1, gt=0, description="passes over the training data when steps is 0")
    grad_clip: float = Field(1.0, ge=0, description="clip the gradient norm to this (0: off)")
    precision: Literal["auto", "fp32", "amp_bf16", "bf16", "pure_bf16"] = Field(
        "auto",
        description="fp32; amp_bf16 (autocast); bf16 or pure_bf16 (bf16 weights, under bf16 "
        "autocast); auto: amp_bf16 on CUDA, fp32 on CPU (open_clip's names)",
    )
    grad_checkpointing: bool = Field(False, description="recompute tower activations")
    compile: bool = Field(False, description="torch.compile the model")
    lock_image: bool = Field(False, description="freeze the image tower")
    lock_image_unlocked_groups: int = Field(
        0, ge=0, description="with lock_image: leave the last N blocks trainable"
    )
    lock_text: bool = Field(False, description="freeze the text tower")
    lock_text_unlocked_layers: int = Field(
        0, ge=0, description="with lock_text: leave the last N layers trainable"
    )
    depth: int = Field(2, gt=0, description="head: linear layers of the MLP")
    width: int = Field(512, gt=0, description="head: hidden width of the MLP")
    out_dim: int = Field(0, ge=0, description="head: output dimension (0: the input's)")
    standardize: bool = Field(
        True,
        description="head: centre the frozen embeddings on the training mean and scale them "
        "to unit variance per dimension on average (folded into the saved first layer)",
    )
    head_init: Literal["random", "identity"] = Field(
        "random",
        description="head: random layers, or identity (starts as its standardised input; "
        "needs out_dim = input and, for depth > 1, width >= 2x input)",
    )
    exploration: float = Field(
        1.0, ge=0, description="head+triplet: UCB exploration constant over bands"
    )
    hard_negative_share: float = Field(
        0.5, ge=0, le=1, description="share of a batch that is queries with mined negatives"
    )
    val_every: int = Field(0, ge=0, description="validate every N steps (0: at the end only)")
    val_k: tuple[int, ...] = Field((1, 5), description="recall@K values to report")
    best_metric: str = Field(
        "val_recall_at_1", description="metric that picks the best checkpoint (higher wins)"
    )
    early_stopping_patience: int = Field(
        0, ge=0, description="stop after N validations without improvement (0: off)"
    )
    checkpoint_every: int = Field(0, ge=0, description="write a checkpoint every N steps")
    seed: int = Field(0, description="seed of the data order and initialisation")
    device: str = Field("auto", description="auto, cpu, cuda or cuda:N")
    num_workers: int = Field(1, ge=0, description="DataLoader decoding processes")
    nproc_per_node: int = Field(
        0, ge=0, description="processes (GPUs) in this pod; 0: every visible GPU"
    )
    accelerator_type: str = Field(
        "", description="GPU the cluster step requests", json_schema_extra=COMPILE_TIME
    )
    accelerator_limit: int = Field(
        1, ge=1, description="GPUs the cluster step requests", json_schema_extra=COMPILE_TIME
    )
    num_nodes: int = Field(
        1, ge=1, description="nodes of a multi-node job", json_schema_extra=COMPILE_TIME
    )

    @field_validator("nested_dims", mode="before")
    @classmethod
    def _dims_from_text(cls, value: Any) -> Any:
        """ "32,64,128" as a list (a search choice or a Katib parameter is text)."""
        if isinstance(value, str):
            parts = [part.strip() for part in value.split(",") if part.strip()]
            try:
                return tuple(int(part) for part in parts)
            except ValueError:
                raise ValueError(
                    f"nested_dims: {value!r} is not a comma-separated list of integers"
                ) from None
        return value

    @field_validator("nested_dims", mode="after")
    @classmethod
    def _dims_sorted(cls, value: tuple[int, ...]) -> tuple[int, ...]:
        return tuple(sorted(set(value)))

    @model_validator(mode="after")
    def _combinations(self) -> TrainSettings:
        # The one loss that needs negatives of its anchors' own modality (a test holds this to
        # the registry's needs_negatives; settings stay free of torch).
        if self.loss == "triplet" and self.mode == "finetune" and self.pairs == "image_text":
            raise ValueError(
                "loss: triplet compares images with images; use it with mode head, "
                "or pairs image_image"
            )
        if self.mode == "head" and self.pairs == "image_text" and "pairs" in self.model_fields_set:
            raise ValueError("pairs: a head is trained on images only (image_image)")
        if self.pairs == "image_signal":
            if self.loss == "triplet":
                raise ValueError(
                    "loss: triplet needs negatives of the anchor's own modality; image_signal "
                    "takes infonce, pairwise_sigmoid, pairwise_sigmoid_upwtdpos or "
                    "multipos_sigmoid"
                )
            if not self.signal_column:
                raise ValueError("signal_column: image_signal needs the signal column to train on")
        if self.lock_image_unlocked_groups and not self.lock_image:
            raise ValueError("lock_image_unlocked_groups: needs lock_image")
        if self.lock_text_unlocked_layers and not self.lock_text:
            raise ValueError("lock_text_unlocked_layers: needs lock_text")
        if not self.templates:
            raise ValueError("templates: give at least one caption template")
        for template in self.templates:
            try:
                template.format(concept="c", category="k")
            except (KeyError, IndexError, ValueError) as error:
                raise ValueError(
                    f"templates: {template!r} may use only {{concept}} and {{category}} ({error})"
                ) from None
        if any(dim <= 0 for dim in self.nested_dims):
            raise ValueError("nested_dims: every dimension must be positive")
        if any(k <= 0 for k in self.val_k):
            raise ValueError("val_k: every K must be positive")
        if not self.best_metric.replace("_", "").isalnum():
            raise ValueError(f"best_metric: {self.best_metric!r} is not a metric name")
        return self

    @property
    def image_text(self) -> bool:
        return self.mode == "finetune" and self.pairs == "image_text"
