from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from embedpipe.core import storage
from embedpipe.data.demo_data import MANIFEST_NAME, DemoSpec, generate_demo_dataset


def test_layout_and_counts(demo_dir):
    manifest = storage.read_json(str(demo_dir / MANIFEST_NAME))
    images = [p for p in demo_dir.rglob("*") if p.suffix in (".jpg", ".png")]
    assert len(images) == manifest["files"] == 400 + 4 + 4 + 3
    concepts = {p.parent.relative_to(demo_dir).parts[1:] for p in images}
    assert len(concepts) == 4 * 5
    assert len({c for c, _ in concepts}) == 4


def test_generation_is_deterministic(tmp_path):
    spec = DemoSpec(categories=2, concepts=2, images=4)
    for name in ("a", "b"):
        generate_demo_dataset(str(tmp_path / name), spec)
    files = [
        {
            p.relative_to(tmp_path / n): p.read_bytes()
            for p in (tmp_path / n).rglob("*")
            if p.is_file()
        }
        for n in ("a", "b")
    ]
    assert files[0] == files[1]


def test_planted_duplicates_cross_splits(demo_dir):
    manifest = storage.read_json(str(demo_dir / MANIFEST_NAME))
    for original, copy in manifest["exact_duplicates"]:
        assert original.startswith("train/") and copy.startswith("test/")
        assert (demo_dir / original).read_bytes() == (demo_dir / copy).read_bytes()
    for original, near in manifest["near_duplicates"]:
        a = Image.open(demo_dir / original).convert("L").resize((32, 32))
        b = Image.open(demo_dir / near).convert("L").resize((32, 32))
        diff = np.abs(np.asarray(a, float) - np.asarray(b, float)).mean()
        assert (demo_dir / original).read_bytes() != (demo_dir / near).read_bytes()
        assert diff < 12  # same picture, re-encoded, resized, brightened


def test_concepts_differ_more_than_views_of_one_concept(demo_dir):
    def mean_colour(path: Path):
        return np.asarray(Image.open(path).convert("RGB"), float).reshape(-1, 3).mean(0)

    folder = demo_dir / "train" / "disc"
    concepts = sorted(folder.iterdir())
    assert len(concepts) == 5
    sizes = {Image.open(p).size for p in folder.rglob("*.jpg")}
    assert sizes == {(128, 128)}
    views = [mean_colour(p) for p in sorted(concepts[0].glob("*.jpg"))]
    assert np.std(views, axis=0).max() > 1  # pose, scale and background vary


def test_corrupt_files_do_not_decode(demo_dir):
    manifest = storage.read_json(str(demo_dir / MANIFEST_NAME))
    assert len(manifest["corrupt"]) == 3
    for item in manifest["corrupt"]:
        with pytest.raises(Exception), Image.open(demo_dir / item["path"]) as image:  # noqa: B017
            image.load()


def test_bad_spec_is_refused():
    with pytest.raises(ValueError, match="categories must be between"):
        DemoSpec(categories=20)
