"""demo-data: a small, deterministic image dataset with known answers.

Each category is a shape family (disc, box, star, ...); each concept is one
object instance of that shape with its own colour and surface texture; each
image shows it at a random pose, scale and position over a random background.
Files are laid out ``<out>/{train,test}/<category>/<concept>/`` and then
seeded with known problems so later stages have real work to show: exact and
near duplicates of train images planted in test folders (leakage), and
corrupt files. ``demo_manifest.json`` lists every planted item.
"""

from __future__ import annotations

import io
import math
from dataclasses import dataclass

import numpy as np
from PIL import Image, ImageDraw, ImageEnhance

from embedpipe.core import storage
from embedpipe.core.seeding import derived_seed

SHAPES = ("disc", "box", "star", "ring", "triangle", "cross", "hexagon", "arrow")
COLOURS = {
    "red": (214, 48, 49),
    "blue": (9, 132, 227),
    "green": (0, 148, 50),
    "yellow": (253, 203, 110),
    "purple": (108, 92, 231),
    "orange": (225, 112, 85),
    "teal": (0, 206, 201),
    "brown": (121, 85, 72),
}
TEXTURES = ("solid", "striped", "dotted", "checked", "gradient")
MANIFEST_NAME = "demo_manifest.json"


@dataclass(frozen=True)
class DemoSpec:
    categories: int = 4
    # Six objects per shape: a concept split of 0.65 holds two out of each category, so
    # the demo's held-out recall is measured on more than one unseen object.
    concepts: int = 6
    images: int = 20
    train_fraction: float = 0.25
    size: int = 128
    seed: int = 0

    def __post_init__(self) -> None:
        if not 1 <= self.categories <= len(SHAPES):
            raise ValueError(f"categories must be between 1 and {len(SHAPES)}")
        if not 1 <= self.concepts <= len(COLOURS):
            raise ValueError(f"concepts must be between 1 and {len(COLOURS)}")
        if self.images < 2:
            raise ValueError("images must be at least 2 (one train, one test)")
        if self.size < 32:
            raise ValueError("size must be at least 32 pixels")


def concept_names(category_index: int, count: int) -> list[str]:
    colours = list(COLOURS)
    return [
        f"{colours[(j + category_index) % len(colours)]}_{TEXTURES[j % len(TEXTURES)]}"
        for j in range(count)
    ]


def _shape_mask(shape: str, size: int) -> Image.Image:
    mask = Image.new("L", (size, size), 0)
    draw = ImageDraw.Draw(mask)
    c, r = size / 2, size / 2 - 1
    if shape == "disc":
        draw.ellipse((1, 1, size - 2, size - 2), fill=255)
    elif shape == "box":
        draw.rectangle((size * 0.1, size * 0.1, size * 0.9, size * 0.9), fill=255)
    elif shape == "ring":
        draw.ellipse((1, 1, size - 2, size - 2), fill=255)
        draw.ellipse((size * 0.3, size * 0.3, size * 0.7, size * 0.7), fill=0)
    elif shape == "cross":
        draw.rectangle((size * 0.35, 0, size * 0.65, size - 1), fill=255)
        draw.rectangle((0, size * 0.35, size - 1, size * 0.65), fill=255)
    elif shape == "arrow":
        draw.polygon(
            [
                (0, c - r * 0.3),
                (c, c - r * 0.3),
                (c, 0),
                (size - 1, c),
                (c, size - 1),
                (c, c + r * 0.3),
                (0, c + r * 0.3),
            ],
            fill=255,
        )
    else:
        corners = {"star": 10, "triangle": 3, "hexagon": 6}[shape]
        points = []
        for k in range(corners):
            radius = r * (0.45 if shape == "star" and k % 2 else 1.0)
            angle = 2 * math.pi * k / corners - math.pi / 2
            points.append((c + radius * math.cos(angle), c + radius * math.sin(angle)))
        draw.polygon(points, fill=255)
    return mask


def _texture(texture: str, colour: tuple[int, int, int], size: int) -> Image.Image:
    tile = Image.new("RGB", (size, size), colour)
    draw = ImageDraw.Draw(tile)
    dark = tuple(int(v * 0.45) for v in colour)
    step = max(4, size // 8)
    if texture == "striped":
        for x in range(-size, size * 2, step):
            draw.line((x, 0, x + size, size), fill=dark, width=max(2, step // 3))
    elif texture == "dotted":
        for y in range(step // 2, size, step):
            for x in range(step // 2, size, step):
                draw.ellipse((x - step / 4, y - step / 4, x + step / 4, y + step / 4), fill=dark)
    elif texture == "checked":
        for y in range(0, size, step):
            for x in range((y // step % 2) * step, size, 2 * step):
                draw.rectangle((x, y, x + step - 1, y + step - 1), fill=dark)
    elif texture == "gradient":
        ramp = np.linspace(0.35, 1.0, size, dtype=np.float32)[None, :, None]
        pixels = (np.asarray(tile, dtype=np.float32) * ramp).astype(np.uint8)
        tile = Image.fromarray(pixels)
    return tile


def render_image(shape: str, concept: str, size: int, rng: np.random.Generator) -> Image.Image:
    """One view of a concept: random pose, scale, position and background."""
    colour_name, texture = concept.split("_", 1)
    # A smooth random colour field: scenes differ in low frequencies, as photos do, so
    # perceptual hashes of unrelated views stay apart.
    field = Image.fromarray(rng.integers(40, 256, size=(4, 4, 3), dtype=np.uint8), "RGB")
    background = np.asarray(field.resize((size, size), Image.Resampling.BICUBIC), np.float32)
    background = background + rng.normal(0, 6, size=background.shape)
    canvas = Image.fromarray(np.clip(background, 0, 255).astype(np.uint8), "RGB")

    object_size = int(size * rng.uniform(0.45, 0.8))
    surface = _texture(texture, COLOURS[colour_name], object_size)
    mask = _shape_mask(shape, object_size)
    angle = float(rng.uniform(0, 360))
    surface = surface.rotate(angle, resample=Image.Resampling.BICUBIC, expand=True)
    mask = mask.rotate(angle, resample=Image.Resampling.BICUBIC, expand=True)
    span = max(0, size - surface.width)
    position = (int(rng.integers(0, span + 1)), int(rng.integers(0, span + 1)))
    canvas.paste(surface, position, mask)
    return canvas


def _encode(image: Image.Image, fmt: str, quality: int = 90) -> bytes:
    buffer = io.BytesIO()
    if fmt == "JPEG":
        image.save(buffer, "JPEG", quality=quality)
    else:
        image.save(buffer, fmt)
    return buffer.getvalue()


def generate_demo_dataset(out_uri: str, spec: DemoSpec | None = None) -> dict:
    """Write the demo dataset under ``out_uri`` and return its manifest."""
    spec = spec or DemoSpec()
    out_uri = storage.normalize(out_uri)
    train_count = max(1, min(spec.images - 1, round(spec.train_fraction * spec.images)))
    planted: dict[str, list] = {"exact_duplicates": [], "near_duplicates": [], "corrupt": []}
    written = 0

    def put(relative: str, data: bytes) -> str:
        nonlocal written
        storage.write_bytes(storage.join(out_uri, relative), data)
        written += 1
        return relative

    for c_index, shape in enumerate(SHAPES[: spec.categories]):
        for k_index, concept in enumerate(concept_names(c_index, spec.concepts)):
            train_images: list[tuple[str, bytes, Image.Image]] = []
            for i in range(spec.images):
                rng = np.random.default_rng(derived_seed(spec.seed, shape, concept, str(i)))
                image = render_image(shape, concept, spec.size, rng)
                fmt, ext = ("PNG", "png") if i % 10 == 9 else ("JPEG", "jpg")
                split = "train" if i < train_count else "test"
                relative = f"{split}/{shape}/{concept}/{concept}_{i:03d}.{ext}"
                data = _encode(image, fmt)
                put(relative, data)
                if split == "train":
                    train_images.append((relative, data, image))
            original, data, image = train_images[0]
            if k_index == 0:
                copy = put(f"test/{shape}/{concept}/{concept}_copy.jpg", data)
                planted["exact_duplicates"].append([original, copy])
            if k_index == 1:
                smaller = image.resize((spec.size * 9 // 10,) * 2, Image.Resampling.BILINEAR)
                brighter = ImageEnhance.Brightness(smaller).enhance(1.06)
                near = put(
                    f"test/{shape}/{concept}/{concept}_near.jpg", _encode(brighter, "JPEG", 70)
                )
                planted["near_duplicates"].append([original, near])

    first_shape, first_concept = SHAPES[0], concept_names(0, spec.concepts)[0]
    folder = f"test/{first_shape}/{first_concept}"
    some_jpeg = _encode(
        render_image(first_shape, first_concept, spec.size, np.random.default_rng(spec.seed)),
        "JPEG",
    )
    junk = np.random.default_rng(spec.seed).integers(0, 256, 2048, dtype=np.uint8).tobytes()
    for name, data, reason in (
        ("truncated.jpg", some_jpeg[: len(some_jpeg) * 6 // 10], "truncated JPEG"),
        ("noise.jpg", junk, "random bytes with a .jpg name"),
        ("empty.png", b"", "zero-byte file"),
    ):
        planted["corrupt"].append({"path": put(f"{folder}/{name}", data), "why": reason})

    manifest = {
        "spec": spec.__dict__,
        "layout": "<split>/<category>/<concept>/<image>",
        "files": written,
        "clean_images": spec.categories * spec.concepts * spec.images,
        **planted,
    }
    storage.write_json(storage.join(out_uri, MANIFEST_NAME), manifest)
    return manifest
