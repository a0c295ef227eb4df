import tomllib

import numpy as np
import open_clip
import pytest
import torch
import transformers

from embedpipe.config import load_settings
from embedpipe.models.loading import load_model, save_model
from embedpipe.models.registry import ModelError, get_entry, listing_rows, load_registry

REGISTRY = load_registry()
OPEN_CLIP = [e for e in REGISTRY.values() if e.library == "open_clip"]
TRANSFORMERS = [e for e in REGISTRY.values() if e.library == "transformers"]
B200_BATCH = {
    "bioclip": 2048,
    "bioclip2": 512,
    "clip_vitb32": 2048,
    "clip_vitb16": 1024,
    "clip_vitl14": 512,
    "clip_vitl14_336": 256,
    "clip_rn50": 2048,
    "clip_rn101": 1024,
    "clip_rn101_yfcc15m": 1024,
    "clip_rn50x4": 1024,
    "clip_rn50x16": 256,
    "clip_rn50x64": 128,
    "siglip_vitb16": 1024,
}


def test_every_named_model_is_registered():
    names = set(REGISTRY)
    assert {
        "bioclip",
        "bioclip2",
        "clip_rn50x64",
        "siglip2_vitgopt16_384",
        "vitamin_xl_384",
        "dinov2_giant",
        "dinov3_vitl16",
        "siglip2_so400m_patch14_384",
    } <= names
    assert len(OPEN_CLIP) == 32
    assert {e.max_batch_b200 for e in REGISTRY.values() if e.name not in B200_BATCH} == {None}
    assert {n: REGISTRY[n].max_batch_b200 for n in B200_BATCH} == B200_BATCH


@pytest.mark.parametrize("entry", OPEN_CLIP, ids=lambda e: e.name)
def test_open_clip_entries_match_open_clip_configs(entry):
    config = open_clip.get_model_config(entry.architecture)
    assert config is not None, f"{entry.architecture} is not an open_clip config"
    assert config["embed_dim"] == entry.embed_dim
    assert config["vision_cfg"]["image_size"] == entry.image_size
    if not entry.pretrained.startswith("hf-hub:"):
        assert entry.pretrained in open_clip.list_pretrained_tags_by_model(entry.architecture)
    assert entry.hub_tokenizer == bool(config.get("text_cfg", {}).get("hf_tokenizer_name"))


@pytest.mark.parametrize("entry", TRANSFORMERS, ids=lambda e: e.name)
def test_transformers_entries_build_real_configs(entry):
    model_class = getattr(transformers, entry.architecture)
    config = getattr(transformers, entry.architecture.replace("Model", "Config"))(**entry.arch)
    assert model_class.config_class is type(config)
    vision = getattr(config, "vision_config", config)
    assert vision.hidden_size == entry.embed_dim


@pytest.mark.parametrize(
    "name", ["clip_vitb32", "clip_rn50", "vitamin_s", "dinov2_small", "dinov3_vits16"]
)
def test_small_models_instantiate_and_embed_to_their_dimension(name):
    entry = REGISTRY[name]
    model = load_model(entry, "random")
    pixels = torch.randn(2, 3, entry.image_size, entry.image_size)
    with torch.inference_mode():
        assert model.encode_images(pixels).shape == (2, entry.embed_dim)


def test_listing_shows_each_entry():
    rows = {row[0]: row for row in listing_rows(REGISTRY)}
    assert rows["bioclip"][1:7] == [
        "open_clip",
        "ViT-B-16",
        "hf-hub:imageomics/bioclip",
        "512",
        "224",
        "2048",
    ]
    assert rows["dinov2_base"][6] == "-"
    assert rows["siglip_vitb16"][7] == "text+image (hub tokenizer)"


def test_user_entries_come_from_the_config_file(tmp_path):
    path = tmp_path / "c.toml"
    path.write_text(
        '[models.mine]\nlibrary = "open_clip"\narchitecture = "ViT-S-32-alt"\n'
        "embed_dim = 256\nimage_size = 224\n"
        '[models.clip_vitb32]\npretrained = "laion2b_s34b_b79k"\n'
    )
    settings = load_settings(str(path))
    assert get_entry("mine", settings.models).architecture == "ViT-S-32-alt"
    assert get_entry("clip_vitb32", settings.models).pretrained == "laion2b_s34b_b79k"
    with pytest.raises(ModelError, match=r"\[models.bad\]: embed_dim"):
        load_registry({"bad": {"library": "open_clip", "architecture": "x", "image_size": 1}})
    with pytest.raises(ModelError, match="unknown model 'nope'; known: bioclip"):
        get_entry("nope")


def test_the_shipped_registry_is_valid_toml_with_no_stray_keys():
    from importlib import resources

    raw = tomllib.loads(resources.files("embedpipe.models").joinpath("registry.toml").read_text())
    assert set(raw) == set(REGISTRY)


def same_outputs(a, b, size):
    pixels = torch.randn(3, 3, size, size, generator=torch.Generator().manual_seed(0))
    with torch.inference_mode():
        return torch.equal(a.encode_images(pixels), b.encode_images(pixels))


def test_open_clip_checkpoint_round_trip_local_and_s3(tiny_entry, tmp_path, bucket):
    torch.manual_seed(1)
    model = load_model(tiny_entry, "random")
    save_model(model, str(tmp_path / "ckpt"))
    assert sorted(p.name for p in (tmp_path / "ckpt").iterdir()) == [
        "config.json",
        "model.safetensors",
    ]
    assert same_outputs(model, load_model(tiny_entry, str(tmp_path / "ckpt")), 64)
    save_model(model, f"s3://{bucket}/models/tiny")
    from_s3 = load_model(tiny_entry, f"s3://{bucket}/models/tiny")
    assert same_outputs(model, from_s3, 64)
    assert from_s3.weights_source == f"s3://{bucket}/models/tiny"
    tokens = from_s3.tokenizer()(["a photo of a red disc"])
    assert tokens.shape == (1, 32)


def test_transformers_checkpoint_round_trip(tmp_path):
    entry = REGISTRY["dinov2_small"]
    torch.manual_seed(2)
    model = load_model(entry, "random")
    save_model(model, str(tmp_path / "dino"))
    assert same_outputs(model, load_model(entry, str(tmp_path / "dino")), 224)


def test_a_checkpoint_of_another_architecture_is_refused(tiny_entry, tmp_path):
    save_model(load_model(tiny_entry, "random"), str(tmp_path / "ckpt"))
    with pytest.raises(ModelError, match="checkpoint of embedpipe-tiny, not ViT-S-32-alt"):
        load_model(
            REGISTRY["clip_vitb32"].model_copy(update={"architecture": "ViT-S-32-alt"}),
            str(tmp_path / "ckpt"),
        )


def test_offline_hub_weights_fail_with_a_clear_message():
    with pytest.raises(ModelError, match=r"clip_vitb32: cannot load weights 'openai'.*Offline"):
        load_model(REGISTRY["clip_vitb32"])
    with pytest.raises(ModelError, match=r"dinov2_small: cannot load weights 'facebook/dinov2"):
        load_model(REGISTRY["dinov2_small"])


def test_hub_tokenizers_say_so_offline():
    model = load_model(REGISTRY["siglip_vitb16"], "random")
    with pytest.raises(ModelError, match=r"tokenizer comes from the Hugging Face hub.*tokenizer_"):
        model.encode_texts(["a photo"])
    image_only = load_model(REGISTRY["dinov2_small"], "random")
    with pytest.raises(ModelError, match="image-only model has no text tower"):
        image_only.encode_texts(["a photo"])


def same_state(a, b) -> bool:
    first, second = a.module.state_dict(), b.module.state_dict()
    return first.keys() == second.keys() and all(torch.equal(first[k], second[k]) for k in first)


@pytest.mark.parametrize("name", ["tiny", "dinov2_small"])
def test_random_weights_are_seeded_and_leave_the_global_rng_alone(name, tiny_entry):
    entry = tiny_entry if name == "tiny" else REGISTRY[name]
    torch.manual_seed(123)
    before = torch.random.get_rng_state()
    a = load_model(entry, "random", seed=0)
    assert torch.equal(torch.random.get_rng_state(), before)
    torch.manual_seed(456)  # another global state: the model does not depend on it
    b = load_model(entry, "random", seed=0)
    assert same_state(a, b)
    assert not same_state(a, load_model(entry, "random", seed=1))
    weights = [p.detach().numpy().copy() for p in a.module.parameters()]
    assert all(np.isfinite(w).all() for w in weights)


def test_every_registry_library_has_a_backend_and_no_other():
    from typing import get_args

    from embedpipe.models.backends import BACKENDS
    from embedpipe.models.registry import ModelEntry

    assert set(BACKENDS) == set(get_args(ModelEntry.model_fields["library"].annotation))


def test_an_unknown_library_names_the_entry_and_the_known_libraries():
    from embedpipe.models.backends import backend_for

    with pytest.raises(ModelError, match=r"\[models.mine\]: library"):
        load_registry(
            {"mine": {"library": "timm", "architecture": "x", "embed_dim": 8, "image_size": 8}}
        )
    unchecked = REGISTRY["clip_vitb32"].model_copy(update={"name": "mine", "library": "timm"})
    known = "known: open_clip, signal, trans"
    with pytest.raises(ModelError, match=f"mine: unknown library 'timm'; {known}"):
        backend_for(unchecked)
