"""The optimizer's parameter groups: learning rate by whether a parameter is new, weight decay
by its shape.

As open_clip's ``open_clip_train/optim.py`` (``exclude_from_wd``): a parameter of at most one
dimension (a bias, a norm's gain, the logit scale and bias) is not decayed, every matrix is.
Dimensionality covers all of them without matching substrings of names (``"bn"``, ``"ln"``,
``"bias"``, ``"logit_scale"``), which also caught matrices whose names merely contain them.
"""

from __future__ import annotations

from torch import nn

from embedpipe.config import TrainSettings


def exclude_from_weight_decay(parameter: nn.Parameter) -> bool:
    return parameter.ndim <= 1


def param_groups(module: nn.Module, new: set[str], config: TrainSettings) -> list[dict]:
    """AdamW groups of the trainable parameters of ``module``: those named in ``new`` at
    ``lr``, the pretrained ones at ``tower_lr`` (or ``lr``); each decayed unless excluded."""
    tower_lr = config.tower_lr or config.lr
    groups: dict[tuple[bool, bool], list] = {}
    for name, parameter in module.named_parameters():
        if not parameter.requires_grad:
            continue
        key = (name in new, exclude_from_weight_decay(parameter))
        groups.setdefault(key, []).append(parameter)
    return [
        {
            "params": params,
            "lr": config.lr if is_new else tower_lr,
            "weight_decay": 0.0 if no_decay else config.weight_decay,
        }
        for (is_new, no_decay), params in sorted(groups.items())
    ]
