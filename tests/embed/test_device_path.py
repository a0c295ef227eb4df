"""The device path (torchvision decoding, resize, crop and normalise as tensor ops, the
GPU default) run on CPU tensors against the exact Pillow + open_clip path, on real
photos shipped in scikit-image and scikit-learn."""

import io

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import skimage.data
import torch
from open_clip.transform import PreprocessCfg, image_transform_v2
from PIL import Image
from sklearn.datasets import load_sample_images

from embedpipe.config import EmbedSettings, IngestSettings
from embedpipe.core import datasets
from embedpipe.core.schemas import IMAGES_KIND
from embedpipe.data.ingest import ingest_images
from embedpipe.embed import device_pixels, runtime
from embedpipe.embed import images as embed
from embedpipe.embed.images import embed_images
from embedpipe.models.backends.base import PreprocessSpec
from embedpipe.models.loading import load_model
from embedpipe.models.registry import ModelEntry

# A 224-px open_clip ViT with seeded random weights: real preprocessing, real depth.
VIT_S32 = ModelEntry(
    name="vit_s32", library="open_clip", architecture="ViT-S-32-alt", embed_dim=256, image_size=224
)


def photos() -> dict[str, np.ndarray]:
    found = {name: getattr(skimage.data, name)() for name in ("astronaut", "coffee", "chelsea")}
    found["rocket"] = skimage.data.rocket()
    china, flower = load_sample_images().images
    return {**found, "china": china, "flower": flower}


def encoded(array: np.ndarray, format: str, mode: str = "RGB", **options) -> bytes:
    buffer = io.BytesIO()
    Image.fromarray(array).convert(mode).save(buffer, format, **options)
    return buffer.getvalue()


@pytest.fixture(scope="module")
def photo_images(tmp_path_factory):
    """Real photos as JPEGs (the device decodes them), plus a PNG, a greyscale, a CMYK and an
    EXIF-tagged JPEG (Pillow decodes those in the workers)."""
    root = tmp_path_factory.mktemp("photos")
    files = {f"{name}.jpg": encoded(array, "JPEG", quality=95) for name, array in photos().items()}
    files["astronaut.png"] = encoded(photos()["astronaut"], "PNG")
    files["coffee-grey.jpg"] = encoded(photos()["coffee"], "JPEG", "L", quality=95)
    files["chelsea-cmyk.jpg"] = encoded(photos()["chelsea"], "JPEG", "CMYK", quality=95)
    exif = Image.Exif()
    exif[0x0112] = 6
    files["rocket-exif.jpg"] = encoded(photos()["rocket"], "JPEG", quality=95, exif=exif)
    for name, data in files.items():
        path = root / "src" / "photos" / name.replace(".", "-") / name
        path.parent.mkdir(parents=True)
        path.write_bytes(data)
    out = root / "images"
    ingest_images([str(root / "src")], str(out), IngestSettings(workers=1))
    return str(out)


def vectors(uri: str) -> tuple[list[str], np.ndarray]:
    table = datasets.read_table(uri, "embeddings")
    return table.column("image_id").to_pylist(), np.stack(table.column("embedding").to_pylist())


def run(images_uri: str, out, preprocess: str, **overrides) -> embed.EmbedResult:
    config = EmbedSettings(
        weights="random",
        device="cpu",
        batch_size=4,
        num_workers=0,
        preprocess=preprocess,
        **overrides,
    )
    return embed_images(images_uri, str(out), config, VIT_S32)


def assert_close_per_image(device_uri: str, pil_uri: str, minimum: float = 0.999) -> None:
    device_ids, device_vectors = vectors(device_uri)
    pil_ids, pil_vectors = vectors(pil_uri)
    assert device_ids == pil_ids
    cosines = (device_vectors * pil_vectors).sum(axis=1)  # both are L2-normalised
    assert cosines.min() >= minimum, cosines


def test_device_path_matches_the_pil_path_on_real_photos(photo_images, tmp_path):
    pil = run(photo_images, tmp_path / "pil", "pil")
    device = run(photo_images, tmp_path / "device", "device")
    assert pil.embedded == device.embedded == 10
    assert device.rejected == 0
    assert_close_per_image(device.out_uri, pil.out_uri)


def test_jpegs_the_device_decoder_refuses_fall_back_to_pillow(photo_images, tmp_path, monkeypatch):
    def refuses(*args, **kwargs):
        raise RuntimeError("nvjpeg: unsupported")

    monkeypatch.setattr(device_pixels, "decode_jpeg", refuses)
    device = run(photo_images, tmp_path / "device", "device")
    pil = run(photo_images, tmp_path / "pil", "pil")
    assert device.embedded == 10
    assert_close_per_image(device.out_uri, pil.out_uri)


def test_an_undecodable_image_is_reported_not_fatal(photo_images, tmp_path):
    table = datasets.read_table(photo_images, IMAGES_KIND)
    broken = {
        "bad/jpeg.jpg": b"\xff\xd8\xff\xe0" + bytes(range(256)) * 4,
        "bad/png.png": b"\x89PNG\r\n\x1a\n" + b"\x00" * 64,
    }
    rows = {name: [table.column(name)[0].as_py()] * len(broken) for name in table.column_names}
    rows.update(
        image_id=[f"broken-{i}" for i in range(len(broken))],
        image=list(broken.values()),
        source=list(broken),
    )
    with_broken = pa.concat_tables([table.slice(0, 3), pa.table(rows, schema=table.schema)])
    images_uri = str(tmp_path / "images")
    datasets.write_table(images_uri, with_broken, IMAGES_KIND)
    for preprocess in ("pil", "device"):
        result = run(images_uri, tmp_path / preprocess, preprocess)
        assert (result.embedded, result.rejected) == (3, 2)
        ids, _ = vectors(result.out_uri)
        assert ids == table.column("image_id").to_pylist()[:3]
        rejected = pq.read_table(datasets.side_path(result.out_uri, embed.REJECTED_NAME))
        assert rejected.column("source").to_pylist() == list(broken)
        reasons = rejected.column("reason").to_pylist()
        assert all(r.startswith("cannot decode image") and " at 0x" not in r for r in reasons)


SPECS = {
    "shortest-square-bicubic": PreprocessSpec((224, 224), (0.5,) * 3, (0.25,) * 3),
    "shortest-wide-target": PreprocessSpec((160, 224), (0.5,) * 3, (0.25,) * 3),
    "longest-padded": PreprocessSpec(
        (224, 224), (0.5,) * 3, (0.25,) * 3, resize_mode="longest", fill_color=128
    ),
    "squash-bilinear": PreprocessSpec(
        (96, 128), (0.4, 0.5, 0.6), (0.2, 0.3, 0.4), "bilinear", "squash"
    ),
}


@pytest.mark.parametrize("name", SPECS)
def test_tensor_preprocessing_matches_open_clips_transform(name):
    spec = SPECS[name]
    oracle = image_transform_v2(
        PreprocessCfg(
            size=spec.size,
            mean=spec.mean,
            std=spec.std,
            interpolation=spec.interpolation,
            resize_mode=spec.resize_mode,
            fill_color=spec.fill_color,
        ),
        is_train=False,
    )
    for array in photos().values():
        expected = oracle(Image.fromarray(array))
        tensor = torch.from_numpy(array.copy()).permute(2, 0, 1)
        ours = device_pixels.preprocess([tensor], spec, torch.float32)
        assert ours.shape == (1, *expected.shape)
        # at most a few grey levels apart (resampling rounds differently at some pixels)
        difference = (ours[0] - expected).abs() * torch.tensor(spec.std).view(3, 1, 1) * 255
        assert difference.max() <= 3.01
        assert difference.mean() <= 0.1


def test_bf16_weights_on_cpu_stay_close_to_fp32(photo_images, tmp_path):
    model = load_model(VIT_S32, "random")
    cpu = torch.device("cpu")
    inference = runtime.prepare_inference(model, EmbedSettings(precision="bf16"), cpu)
    assert {p.dtype for p in model.module.parameters()} == {torch.bfloat16}
    assert inference.input_dtype is torch.bfloat16 and inference.autocast is None
    bf16 = run(photo_images, tmp_path / "bf16", "pil", precision="bf16")
    fp32 = run(photo_images, tmp_path / "fp32", "pil", precision="fp32")
    assert_close_per_image(bf16.out_uri, fp32.out_uri, minimum=0.99)


def test_batch_size_and_workers_follow_the_device_unless_set(monkeypatch):
    cpu = torch.device("cpu")
    assert runtime.resolve_batch_size(EmbedSettings(), VIT_S32, cpu) == runtime.CPU_BATCH
    assert runtime.resolve_batch_size(EmbedSettings(batch_size=12), VIT_S32, cpu) == 12
    monkeypatch.setattr(runtime, "available_cores", lambda: 16)
    assert runtime.resolve_workers(EmbedSettings(), cpu, "pil") == 4
    assert runtime.resolve_workers(EmbedSettings(), torch.device("cuda"), "pil") == 15
    assert runtime.resolve_workers(EmbedSettings(), torch.device("cuda"), "device") == 8
    assert runtime.resolve_workers(EmbedSettings(num_workers=0), cpu, "pil") == 0
    monkeypatch.setattr(runtime, "available_cores", lambda: 2)
    assert runtime.resolve_workers(EmbedSettings(), cpu, "pil") == 1


@pytest.mark.parametrize("resize", ["shortest", "squash"])
def test_transformers_preprocessing_spec_matches_its_eval_transform(resize):
    from embedpipe.models.backends.transformers import TransformersBackend

    entry = ModelEntry(
        name="vit",
        library="transformers",
        architecture="Dinov2Model",
        embed_dim=8,
        image_size=224,
        mean=(0.485, 0.456, 0.406),
        std=(0.229, 0.224, 0.225),
        resize=resize,
    )
    backend = TransformersBackend()
    spec, transform = backend.preprocess_spec(entry, None), backend.eval_transform(entry, None)
    for array in photos().values():
        expected = transform(Image.fromarray(array))
        tensor = torch.from_numpy(array.copy()).permute(2, 0, 1)
        ours = device_pixels.preprocess([tensor], spec, torch.float32)[0]
        difference = (ours - expected).abs() * torch.tensor(spec.std).view(3, 1, 1) * 255
        assert difference.max() <= 3.01
