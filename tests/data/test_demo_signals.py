"""demo-data --kind signals: images and spectra rendered from the same hidden parameters,
ingested with the documented commands."""

import io
import json

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from PIL import Image

from embedpipe.cli import main
from embedpipe.core import datasets
from embedpipe.data.demo_signals import (
    EMISSION_LINES,
    MANIFEST_NAME,
    SIGNALS_NAME,
    SignalDemoSpec,
    generate_signal_demo,
    wavelengths,
)
from embedpipe.data.ingest import REJECTED_NAME

SPEC = SignalDemoSpec(objects=12, views=2)


@pytest.fixture(scope="module")
def demo(tmp_path_factory):
    out = tmp_path_factory.mktemp("signals-demo") / "data"
    manifest = generate_signal_demo(str(out), SPEC)
    return out, manifest


def spearman(a, b) -> float:
    ranks = [np.argsort(np.argsort(np.asarray(v))) for v in (a, b)]
    return float(np.corrcoef(*ranks)[0, 1])


def test_layout_table_and_manifest(demo):
    out, manifest = demo
    assert manifest["images"] == 3 * 12 * 2 == len(list(out.rglob("*.png")))
    table = pq.read_table(out / SIGNALS_NAME)
    assert table.schema.field("spectrum").type == pa.list_(pa.float32(), SPEC.bins)
    assert table.schema.field("redshift").type == pa.float64()
    assert table.num_rows == manifest["images"]
    assert all((out / source).is_file() for source in table.column("source").to_pylist())
    assert json.loads((out / MANIFEST_NAME).read_text())["non_finite_spectrum"] == (
        "elliptical/elliptical-000/view_1.png"
    )
    again = generate_signal_demo(str(out.parent / "again"), SPEC)
    assert again["objects"] == manifest["objects"]
    repeated = pq.read_table(out.parent / "again" / SIGNALS_NAME)
    assert repeated.drop_columns("spectrum").equals(table.drop_columns("spectrum"))
    spectra = [t.column("spectrum").combine_chunks().flatten() for t in (table, repeated)]
    np.testing.assert_array_equal(*spectra)  # NaN where NaN
    first = "spiral/spiral-003/view_1.png"
    assert (out / first).read_bytes() == (out.parent / "again" / first).read_bytes()


def test_views_of_an_object_share_its_targets(demo):
    out, manifest = demo
    table = pq.read_table(out / SIGNALS_NAME).to_pylist()
    hidden = {obj["name"]: obj for obj in manifest["objects"]}
    for row in table:
        obj = hidden[row["source"].split("/")[1]]
        assert row["redshift"] == obj["redshift"]
        assert row["stellar_mass"] == obj["stellar_mass"]


def test_the_spectrums_emission_lines_sit_at_rest_wavelength_times_one_plus_z(demo):
    out, _ = demo
    table = pq.read_table(out / SIGNALS_NAME).to_pylist()
    grid = wavelengths(SPEC.bins)
    errors = []
    for row in table:
        if row["source"].startswith("elliptical"):
            continue  # weak lines: measured through the image colour instead
        flux = np.asarray(row["spectrum"])
        # The strongest line over a running median of the continuum is H-alpha.
        padded = np.pad(flux, 7, mode="edge")
        continuum = np.median(np.lib.stride_tricks.sliding_window_view(padded, 15), axis=1)
        peak = grid[np.argmax(flux - continuum)]
        errors.append(peak / EMISSION_LINES["Halpha"] - 1 - row["redshift"])
    errors = np.abs(errors)
    assert np.mean(errors < 0.01) > 0.9, errors


def test_the_images_colour_reddens_with_the_same_redshift_and_the_objects_dust(demo):
    out, manifest = demo
    pooled_z, pooled_ratio = [], []
    for kind in ("elliptical", "spiral", "starburst"):
        objects = [obj for obj in manifest["objects"] if obj["kind"] == kind]
        ratios = []
        for obj in objects:
            image = Image.open(out / kind / obj["name"] / "view_0.png")
            pixels = np.asarray(image, dtype=np.float64)
            galaxy = pixels.sum(axis=2) > pixels.sum(axis=2).max() * 0.5
            red, blue = pixels[galaxy, 0].mean(), pixels[galaxy, 2].mean()
            ratios.append(red / blue)
        reddening = [1.8 * obj["redshift"] + obj["dust"] for obj in objects]
        assert spearman(reddening, ratios) > 0.9, kind
        redshifts = [obj["redshift"] for obj in objects]
        assert spearman(redshifts, ratios) > 0.5, kind  # dust blurs it: a partial cue
        pooled_z += redshifts
        pooled_ratio += list(np.argsort(np.argsort(ratios)))  # ranks within the type
    assert spearman(pooled_z, pooled_ratio) > 0.6


def test_documented_commands_ingest_the_demo_and_reject_the_planted_nan(tmp_path, capsys):
    out = tmp_path / "demo"
    code = main(["demo-data", "--kind", "signals", str(out), "--concepts", "3", "--images", "2"])
    assert code == 0
    assert "--signals" in capsys.readouterr().out
    images = tmp_path / "images"
    code = main(["ingest", str(out), "--out", str(images), "--signals", str(out / SIGNALS_NAME),
                 "--signal-key", "source", "--workers", "1"])  # fmt: skip
    assert code == 0
    result = json.loads(capsys.readouterr().out)
    assert (result["images"], result["rejected"]) == (17, 1)
    reasons = pq.read_table(datasets.side_path(str(images), REJECTED_NAME)).to_pylist()
    assert reasons == [
        {
            "source": str(out / "elliptical/elliptical-000/view_1.png"),
            "reason": "signal 'spectrum' has 1 non-finite value(s) (first at index 128: nan)",
        }
    ]
    table = datasets.read_table(str(images), "images").to_pylist()
    assert {row["category"] for row in table} == {"elliptical", "spiral", "starburst"}
    assert len({row["concept"] for row in table}) == 9
    row = table[0]
    assert len(row["spectrum"]) == SPEC.bins and isinstance(row["redshift"], float)
    assert Image.open(io.BytesIO(row["image"])).size == (64, 64)
