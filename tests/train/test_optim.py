"""Weight-decay groups by shape, checked against open_clip's trainer on the models we train."""

import open_clip
import torch
from conftest import TINY_OPEN_CLIP
from torch import nn

from embedpipe.config import TrainSettings
from embedpipe.models.heads import ProjectionHead
from embedpipe.train.finetune import DualEncoder
from embedpipe.train.head import HeadModule
from embedpipe.train.optim import param_groups

SETTINGS = TrainSettings(lr=1e-3, tower_lr=1e-5, weight_decay=0.2)


def open_clip_3_3_excludes(name: str, parameter: nn.Parameter) -> bool:
    """open_clip 3.3's ``open_clip_train/main.py`` rule, by substrings of names."""
    return (
        parameter.ndim < 2
        or "bn" in name
        or "ln" in name
        or "bias" in name
        or "logit_scale" in name
    )


def grouping(groups: list[dict]) -> dict[int, tuple[float, float]]:
    return {id(p): (g["lr"], g["weight_decay"]) for g in groups for p in g["params"]}


def assert_same_as_open_clip(module: nn.Module, new: set[str]) -> None:
    expected = {
        id(p): (
            SETTINGS.lr if name in new else SETTINGS.tower_lr,
            0.0 if open_clip_3_3_excludes(name, p) else SETTINGS.weight_decay,
        )
        for name, p in module.named_parameters()
        if p.requires_grad
    }
    assert grouping(param_groups(module, new, SETTINGS)) == expected


def test_groups_of_the_tiny_clip_and_a_resnet_clip_are_open_clips():
    vit = DualEncoder(open_clip.CLIP(**TINY_OPEN_CLIP), image_text=True)
    vit.clip.logit_bias = nn.Parameter(torch.full([], -10.0))  # as a sigmoid loss adds it
    assert_same_as_open_clip(vit, {"clip.logit_bias"})
    resnet = open_clip.CLIP(
        embed_dim=32,
        vision_cfg={"image_size": 64, "layers": [1, 1, 1, 1], "width": 16},
        text_cfg={"context_length": 16, "vocab_size": 100, "width": 32, "heads": 2, "layers": 1},
    )
    assert any(".bn" in name for name, _ in resnet.named_parameters())
    assert_same_as_open_clip(resnet, set())


def test_groups_of_a_head_are_open_clips():
    head = HeadModule(ProjectionHead(8, 2, 16, 8), 2.6, -10.0, torch.zeros(8), 1.0)
    names = {name for name, _ in head.named_parameters()}
    assert {"logit_scale", "logit_bias"} <= names
    assert_same_as_open_clip(head, names)


def test_a_matrix_is_decayed_whatever_its_name_and_frozen_parameters_are_left_out():
    module = nn.Module()
    module.relative_position_bias_table = nn.Parameter(torch.zeros(9, 2))  # as in Swin
    module.ln_gain = nn.Parameter(torch.ones(4))
    module.frozen = nn.Parameter(torch.ones(4, 4), requires_grad=False)
    groups = param_groups(module, set(), SETTINGS)
    assert grouping(groups) == {
        id(module.relative_position_bias_table): (SETTINGS.tower_lr, SETTINGS.weight_decay),
        id(module.ln_gain): (SETTINGS.tower_lr, 0.0),
    }
