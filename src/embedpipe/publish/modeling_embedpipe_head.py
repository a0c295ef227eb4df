"""An image-embedding model published by embedpipe: a backbone's image tower (open_clip's,
or a transformers vision model) and the projection head trained on its embeddings, as one
transformers model.

    from transformers import AutoImageProcessor, AutoModel
    processor = AutoImageProcessor.from_pretrained(DIR, trust_remote_code=True)
    model = AutoModel.from_pretrained(DIR, trust_remote_code=True)
    embeddings = model(**processor(images=pictures, return_tensors="pt"))

``forward(pixel_values)`` (and ``get_image_features``) returns L2-normalised embeddings;
``embed(images)`` takes PIL images or a pixel tensor. The image processor is open_clip's own
eval transform, so pixels match what open_clip (and embedpipe) feed the backbone. Needs
torch, transformers and open_clip_torch; this file is copied as is into each published model.
"""

import torch
import transformers
from open_clip.model import CLIPVisionCfg, _build_vision_tower
from open_clip.transform import PreprocessCfg, image_transform_v2
from PIL import Image
from transformers import BatchFeature, PretrainedConfig, PreTrainedModel
from transformers.image_processing_utils import BaseImageProcessor

_ACTIVATIONS = {"gelu": torch.nn.GELU, "relu": torch.nn.ReLU}
_PREPROCESS_KEYS = ("size", "mode", "mean", "std", "interpolation", "resize_mode", "fill_color")


class EmbedpipeHeadConfig(PretrainedConfig):
    """``backbone_library``: ``open_clip`` (``open_clip_model_cfg``, the backbone's open_clip
    model config, builds the image tower) or ``transformers`` (``transformers_config`` builds
    the ``transformers_architecture`` class; ``transformers_features`` says how it gives
    image features); ``preprocess_cfg``: open_clip's terms for the backbone's preprocessing;
    ``normalize_input``: the head learnt from L2-normalised backbone embeddings;
    ``nested_dims``: the prefixes it was trained to embed with (Matryoshka: the first N
    dimensions, renormalised, are an embedding too), empty if none; the rest shapes the
    head (``depth`` linear layers in_dim -> width ... -> out_dim)."""

    model_type = "embedpipe_head"

    def __init__(
        self,
        in_dim=512,
        out_dim=128,
        width=0,
        depth=1,
        activation="gelu",
        normalize=True,
        normalize_input=True,
        open_clip_model_cfg=None,
        preprocess_cfg=None,
        backbone=None,
        backbone_library="open_clip",
        transformers_architecture="",
        transformers_config=None,
        transformers_features="pooler_output",
        nested_dims=(),
        **kwargs,
    ):
        self.backbone_library = backbone_library
        self.transformers_architecture = transformers_architecture
        self.transformers_config = transformers_config or {}
        self.transformers_features = transformers_features
        self.in_dim = in_dim
        self.out_dim = out_dim
        self.width = width
        self.depth = depth
        self.activation = activation
        self.normalize = normalize
        self.normalize_input = normalize_input
        self.open_clip_model_cfg = open_clip_model_cfg or {}
        self.preprocess_cfg = preprocess_cfg or {}
        self.backbone = backbone or {}
        self.nested_dims = [int(dim) for dim in nested_dims or ()]
        super().__init__(**kwargs)


def _eval_transform(preprocess_cfg):
    config = {key: preprocess_cfg[key] for key in _PREPROCESS_KEYS if key in preprocess_cfg}
    return image_transform_v2(PreprocessCfg(**config), is_train=False)


def _head_layers(config):
    sizes = [config.in_dim, *([config.width or config.in_dim] * (config.depth - 1))]
    sizes.append(config.out_dim)
    layers = []
    for index in range(config.depth):
        if index:
            layers.append(_ACTIVATIONS[config.activation]())
        layers.append(torch.nn.Linear(sizes[index], sizes[index + 1]))
    return torch.nn.Sequential(*layers)


class EmbedpipeHeadModel(PreTrainedModel):
    config_class = EmbedpipeHeadConfig
    base_model_prefix = "embedpipe"
    main_input_name = "pixel_values"

    def __init__(self, config):
        super().__init__(config)
        if config.backbone_library == "transformers":
            settings = dict(config.transformers_config)
            backbone_config = transformers.AutoConfig.for_model(**settings)
            self.visual = getattr(transformers, config.transformers_architecture)(backbone_config)
        else:
            model_cfg = config.open_clip_model_cfg
            self.visual = _build_vision_tower(
                model_cfg["embed_dim"],
                CLIPVisionCfg(**model_cfg["vision_cfg"]),
                quick_gelu=model_cfg.get("quick_gelu", False),
            )
        self.head = _head_layers(config)
        self._transform = None
        self.post_init()

    def _init_weights(self, module):
        pass  # every weight is in model.safetensors; open_clip initialised the rest

    def get_image_features(self, pixel_values):
        """Preprocessed pixels (batch, 3, H, W) -> L2-normalised embeddings (batch, out_dim)."""
        features = self._backbone_features(pixel_values).float()
        if self.config.normalize_input:
            features = torch.nn.functional.normalize(features, dim=-1)
        return torch.nn.functional.normalize(self.head(features), dim=-1)

    def _backbone_features(self, pixel_values):
        if self.config.backbone_library != "transformers":
            return self.visual(pixel_values)
        if self.config.transformers_features == "get_image_features":
            output = self.visual.get_image_features(pixel_values=pixel_values)
            return output if torch.is_tensor(output) else output.pooler_output
        return self.visual(pixel_values=pixel_values).pooler_output

    def forward(self, pixel_values, **kwargs):
        return self.get_image_features(pixel_values)

    @torch.no_grad()
    def embed(self, images):
        """PIL images (or one image), or a preprocessed pixel tensor -> embeddings."""
        if torch.is_tensor(images):
            pixels = images
        else:
            if self._transform is None:
                self._transform = _eval_transform(self.config.preprocess_cfg)
            images = images if isinstance(images, list | tuple) else [images]
            pixels = torch.stack([self._transform(image) for image in images])
        parameter = next(self.parameters())
        return self.get_image_features(pixels.to(parameter.device, parameter.dtype))


class EmbedpipeImageProcessor(BaseImageProcessor):
    """open_clip's eval transform of the backbone (resize, crop, to tensor, normalise)."""

    model_input_names = ["pixel_values"]  # noqa: RUF012 (transformers' own attribute)

    def __init__(self, preprocess_cfg=None, **kwargs):
        super().__init__(**kwargs)
        self.preprocess_cfg = dict(preprocess_cfg or {})

    def __call__(self, images, **kwargs):
        return self.preprocess(images, **kwargs)

    def preprocess(self, images, return_tensors="pt", **kwargs):
        """PIL images, or HWC uint8 arrays, one or a list -> ``{"pixel_values": tensor}``."""
        transform = _eval_transform(self.preprocess_cfg)
        images = images if isinstance(images, list | tuple) else [images]
        pixels = torch.stack(
            [transform(i if isinstance(i, Image.Image) else Image.fromarray(i)) for i in images]
        )
        return BatchFeature({"pixel_values": pixels}, tensor_type=return_tensors)
