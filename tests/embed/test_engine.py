"""The embedding engine on its own: ``vectors_for`` (the loader's one entry point for a
list of ids, which evaluate and train use) against embed's output, and the OpenMP
setting made where embedding processes start, not on import."""

import os
import subprocess
import sys

import numpy as np
import pyarrow as pa
import pytest
import torch
from conftest import flat_tree

from embedpipe.config import EmbedSettings, IngestSettings
from embedpipe.core import datasets
from embedpipe.core.schemas import IMAGES_KIND
from embedpipe.data.ingest import ingest_images
from embedpipe.embed.images import embed_images
from embedpipe.embed.loader import MissingImages, UndecodableImages, vectors_for
from embedpipe.embed.runtime import LoaderOptions, prepare_inference
from embedpipe.models.loading import load_model


@pytest.fixture(scope="module")
def few_images(tmp_path_factory) -> str:
    root = tmp_path_factory.mktemp("engine")
    flat_tree(root / "src", categories=2, concepts=2, images=3)
    ingest_images([str(root / "src")], str(root / "images"), IngestSettings(workers=1))
    return str(root / "images")


CPU = torch.device("cpu")
SETTINGS = EmbedSettings(weights="random", seed=1, device="cpu", num_workers=0, batch_size=5)


def test_vectors_for_gives_embeds_vectors_in_the_order_asked(few_images, tiny_entry, tmp_path):
    result = embed_images(few_images, str(tmp_path / "emb"), SETTINGS, tiny_entry)
    table = datasets.read_table(result.out_uri, "embeddings")
    ids, rows = table.column("image_id").to_pylist(), table.column("embedding").to_pylist()
    embedded = dict(zip(ids, rows, strict=True))
    asked = [ids[5], ids[0], ids[11], ids[5]]  # any order, repeats allowed
    model = load_model(tiny_entry, "random", "cpu", seed=1)
    for workers in (0, 2):
        inference = prepare_inference(model, SETTINGS, CPU)
        vectors = vectors_for(few_images, asked, inference, LoaderOptions(workers=workers))
        np.testing.assert_allclose(vectors, [embedded[i] for i in asked], rtol=1e-5, atol=1e-6)


def test_vectors_for_names_what_it_cannot_give(few_images, tiny_entry, tmp_path):
    model = load_model(tiny_entry, "random", "cpu")
    inference = prepare_inference(model, SETTINGS, CPU)
    known = datasets.read_table(few_images, IMAGES_KIND, ["image_id"]).column(0)[0].as_py()
    with pytest.raises(MissingImages, match=r"1 of the 2 image\(s\) asked for .* \(e\.g\. nope\)"):
        vectors_for(few_images, [known, "nope"], inference)

    table = datasets.read_table(few_images, IMAGES_KIND)
    broken = table.slice(0, 1).to_pylist()[0]
    broken.update(image_id="broken", image=b"\x89PNG\r\n\x1a\n" + b"\x00" * 64, source="bad.png")
    with_broken = pa.concat_tables([table, pa.Table.from_pylist([broken], schema=table.schema)])
    images_uri = str(tmp_path / "with-broken")
    datasets.write_table(images_uri, with_broken, IMAGES_KIND)
    with pytest.raises(UndecodableImages, match=r"image broken cannot be decoded \(bad\.png: "):
        vectors_for(images_uri, [known, "broken"], inference)


def _python(code: str, **env: str) -> str:
    clean = {key: value for key, value in os.environ.items() if key != "OMP_WAIT_POLICY"}
    done = subprocess.run(
        [sys.executable, "-c", code],
        env={**clean, **env},
        capture_output=True,
        text=True,
        check=True,
    )
    return done.stdout.strip()


def test_openmp_waits_passively_where_embedding_starts_not_on_import(tmp_path):
    imports = "import os, embedpipe.train.stage, embedpipe.evaluate.stage, embedpipe.embed.images"
    assert _python(f"{imports}; print(os.environ.get('OMP_WAIT_POLICY'))") == "None"
    # the embed command sets it before torch loads (else OpenMP would not read it)
    command = f"""
import os, sys
from embedpipe.embed import openmp
real = openmp.passive_wait
def checked():
    assert "torch" not in sys.modules, "torch was loaded first"
    real()
openmp.passive_wait = checked
from embedpipe.cli import main
main(["embed", {str(tmp_path / "missing")!r}, "--out", {str(tmp_path / "out")!r}])
print(os.environ.get("OMP_WAIT_POLICY"))
"""
    assert _python(command).splitlines()[-1] == "PASSIVE"
    assert _python(command, OMP_WAIT_POLICY="ACTIVE").splitlines()[-1] == "ACTIVE"


def test_vectors_for_names_each_undecodable_image_with_its_own_source(
    few_images, tiny_entry, tmp_path
):
    """Two workers read a shard's row groups in turns, so its batches arrive out of row
    order; each undecodable image is still named with its own source."""
    table = datasets.read_table(few_images, IMAGES_KIND)
    rows = table.to_pylist()
    for row in (2, 7):  # row group 0's second batch, row group 1's first
        rows[row].update(image=b"\x89PNG\r\n\x1a\n" + b"\x00" * 64, source=f"bad{row}.png")
    images_uri = str(tmp_path / "broken")
    with datasets.DatasetWriter(images_uri, table.schema, IMAGES_KIND, 100, 6) as out:
        out.write(pa.Table.from_pylist(rows, schema=table.schema))
        out.finish()
    model = load_model(tiny_entry, "random", "cpu")
    settings = SETTINGS.model_copy(update={"batch_size": 2})
    inference = prepare_inference(model, settings, CPU)
    ids = [row["image_id"] for row in rows]
    with pytest.raises(UndecodableImages) as raised:
        vectors_for(images_uri, ids, inference, LoaderOptions(workers=2))
    named = {image_id: source for image_id, source, _ in raised.value.failed}
    assert named == {ids[2]: "bad2.png", ids[7]: "bad7.png"}
