"""A projection head on a frozen image-embedding backbone, as a transformers custom model.

Published beside config.json and loaded with
``AutoModel.from_pretrained(DIR, trust_remote_code=True)``. Its input is the backbone's
image embeddings (``config.backbone`` names that model); this file needs only torch and
transformers, so it is copied as is into each published model.
"""

import torch
from transformers import PretrainedConfig, PreTrainedModel


class EmbedpipeHeadConfig(PretrainedConfig):
    model_type = "embedpipe_head"

    def __init__(
        self,
        in_dim=512,
        out_dim=128,
        width=0,
        depth=1,
        activation="gelu",
        normalize=True,
        backbone=None,
        **kwargs,
    ):
        self.in_dim = in_dim
        self.out_dim = out_dim
        self.width = width
        self.depth = depth
        self.activation = activation
        self.normalize = normalize
        self.backbone = backbone or {}
        super().__init__(**kwargs)


_ACTIVATIONS = {"gelu": torch.nn.GELU, "relu": torch.nn.ReLU}


class EmbedpipeHeadModel(PreTrainedModel):
    config_class = EmbedpipeHeadConfig
    base_model_prefix = "head"

    def __init__(self, config):
        super().__init__(config)
        sizes = [config.in_dim] + [config.width or config.in_dim] * (config.depth - 1)
        sizes.append(config.out_dim)
        layers = []
        for index in range(config.depth):
            layers.append(torch.nn.Linear(sizes[index], sizes[index + 1]))
            if index < config.depth - 1:
                layers.append(_ACTIVATIONS[config.activation]())
        self.layers = torch.nn.Sequential(*layers)
        self.post_init()

    def _init_weights(self, module):
        if isinstance(module, torch.nn.Linear):
            torch.nn.init.normal_(module.weight, std=0.02)
            torch.nn.init.zeros_(module.bias)

    def forward(self, embeddings):
        """Backbone image embeddings (batch, in_dim) -> head embeddings (batch, out_dim)."""
        projected = self.layers(embeddings)
        if self.config.normalize:
            projected = torch.nn.functional.normalize(projected, dim=-1)
        return projected
