"""Hugging Face datasets whose images are pixel arrays (Array3D, as AstroCLIP's Legacy
Survey x DESI set ships them) and whose spectra are Array2D (N, 1): ingest writes 8-bit
PNGs and flat list<float32> signals, and rejects what makes no picture or signal."""

import io

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from PIL import Image

from embedpipe.cli import main
from embedpipe.config import IngestSettings
from embedpipe.core import datasets
from embedpipe.core.schemas import IMAGES_SCHEMA
from embedpipe.data.array_images import to_uint8
from embedpipe.data.ingest import REJECTED_NAME, ingest_images
from embedpipe.data.signals import SignalError

SIDE = 12
LENGTH = 40


def settings(**changes) -> IngestSettings:
    return IngestSettings(workers=1, **changes)


def expected_pixels(values: np.ndarray) -> np.ndarray:
    """The documented rule, written out: percentiles 1 and 99 of all bands -> 0 and 255."""
    flat = np.sort(values.astype(np.float64).ravel())
    low, high = np.percentile(flat, 1), np.percentile(flat, 99)
    out = np.empty(values.shape, np.uint8)
    for index, value in np.ndenumerate(values.astype(np.float64)):
        fraction = min(max((value - low) / (high - low), 0.0), 1.0)
        out[index] = int(np.rint(fraction * 255))
    return out


def galaxy(seed: int, shape=(SIDE, SIDE, 3)) -> np.ndarray:
    """Sky-subtracted flux: noise around zero (negatives included) and a bright blob."""
    rng = np.random.default_rng(seed)
    y, x = np.mgrid[: shape[0], : shape[1]]
    blob = 50.0 * np.exp(-((y - 6) ** 2 + (x - 5) ** 2) / 6.0)
    flux = blob[..., None] * np.array([0.5, 1.0, 1.5])[: shape[2]] + rng.normal(size=shape)
    return flux.astype(np.float32)


def spectrum(seed: int) -> np.ndarray:
    return np.random.default_rng(100 + seed).normal(size=(LENGTH, 1)).astype(np.float32)


def decoded(data: bytes) -> np.ndarray:
    return np.asarray(Image.open(io.BytesIO(data)))


def rejected(out) -> dict[str, str]:
    table = pq.read_table(datasets.side_path(str(out), REJECTED_NAME)).to_pylist()
    return {row["source"]: row["reason"] for row in table}


def astroclip_like(count: int):
    import datasets as hf

    features = hf.Features(
        {
            "image": hf.Array3D(shape=(SIDE, SIDE, 3), dtype="float32"),
            "spectrum": hf.Array2D(shape=(LENGTH, 1), dtype="float32"),
            "redshift": hf.Value("float32"),
        }
    )
    images = [galaxy(i) for i in range(count)]
    images[2][3, 4, 1] = np.nan
    rows = {
        "image": images,
        "spectrum": [spectrum(i) for i in range(count)],
        "redshift": [0.05 * i for i in range(count)],
    }
    return hf.Dataset.from_dict(rows, features=features), images


def test_array3d_images_and_array2d_spectra_from_save_to_disk_and_parquet_shards(tmp_path):
    dataset, images = astroclip_like(6)
    dataset.save_to_disk(str(tmp_path / "disk"))
    dataset.to_parquet(str(tmp_path / "hub" / "data" / "train-00000-of-00001.parquet"))
    result = ingest_images([str(tmp_path / "disk")], str(tmp_path / "out"), settings())
    assert (result.images, result.rejected) == (5, 1)
    table = datasets.read_table(str(tmp_path / "out"), "images")
    assert table.schema.names == [*IMAGES_SCHEMA.names, "spectrum", "redshift"]
    assert table.schema.field("spectrum").type == pa.list_(pa.float32())
    got = {row["source"]: row for row in table.to_pylist()}
    for i in (0, 1, 3, 5):
        row = got[f"{tmp_path / 'disk'}::rows/{i}"]
        assert (row["width"], row["height"]) == (SIDE, SIDE)
        assert Image.open(io.BytesIO(row["image"])).format == "PNG"
        np.testing.assert_array_equal(decoded(row["image"]), expected_pixels(images[i]))
        np.testing.assert_array_equal(np.float32(row["spectrum"]), spectrum(i)[:, 0])
        assert row["redshift"] == pytest.approx(0.05 * i, rel=1e-6)
    assert datasets.read_manifest(str(tmp_path / "out"))["signals"]["columns"] == {
        "spectrum": {"kind": "signal", "length": LENGTH},
        "redshift": {"kind": "scalar"},
    }
    assert rejected(tmp_path / "out") == {
        f"{tmp_path / 'disk'}::rows/2": "the image array has 1 non-finite value(s) "
        "(first at (3, 4, 1): nan)"
    }

    ingest_images([str(tmp_path / "hub")], str(tmp_path / "out-hub"), settings())
    shards = datasets.read_table(str(tmp_path / "out-hub"), "images")
    assert shards.column("image_id").to_pylist() == table.column("image_id").to_pylist()
    assert shards.column("split").to_pylist() == ["train"] * 5
    assert shards.column("spectrum").to_pylist() == table.column("spectrum").to_pylist()


def test_the_scaling_rule_by_hand():
    ramp = np.arange(101, dtype=np.float32).reshape(1, 101)  # percentiles 1 and 99: 1, 99
    pixels = to_uint8(ramp)[0]
    assert [pixels[0], pixels[1], pixels[50], pixels[99], pixels[100]] == [0, 0, 128, 255, 255]
    sparse = np.zeros((10, 10), np.float64)
    sparse[4, 4] = 7.0  # percentiles 1 and 99 are both 0: minimum and maximum instead
    assert to_uint8(sparse)[4, 4] == 255 and to_uint8(sparse).sum() == 255
    assert not to_uint8(np.full((3, 3), 2.5)).any()
    stored = np.arange(48, dtype=np.uint8).reshape(4, 4, 3)
    assert to_uint8(stored) is stored
    assert to_uint8(np.array([[1.0, np.inf]])).startswith("the image array has 1 non-finite")


@pytest.mark.parametrize(
    ("shape", "dtype", "mode"),
    [
        ((SIDE, SIDE + 2, 3), "uint8", "RGB"),
        ((3, SIDE, SIDE + 2), "float32", "RGB"),
        ((SIDE, SIDE + 2, 1), "float64", "L"),
        ((1, SIDE, SIDE + 2), "uint8", "L"),
        ((SIDE, SIDE + 2), "float32", "L"),
    ],
)
def test_channels_first_or_last_grey_or_rgb(tmp_path, shape, dtype, mode):
    import datasets as hf

    rng = np.random.default_rng(7)
    if dtype == "uint8":
        arrays = [rng.integers(0, 256, size=shape, dtype=np.uint8) for _ in range(3)]
    else:
        arrays = [rng.normal(size=shape).astype(dtype) for _ in range(3)]
    feature = hf.Array3D if len(shape) == 3 else hf.Array2D
    features = hf.Features({"image": feature(shape=shape, dtype=dtype)})
    hf.Dataset.from_dict({"image": arrays}, features=features).save_to_disk(str(tmp_path / "hf"))
    ingest_images([str(tmp_path / "hf")], str(tmp_path / "out"), settings())
    rows = datasets.read_table(str(tmp_path / "out"), "images").to_pylist()
    assert [(row["width"], row["height"]) for row in rows] == [(SIDE + 2, SIDE)] * 3
    for row, array in zip(rows, arrays, strict=True):
        hwc = np.moveaxis(array, 0, 2) if shape[0] in (1, 3) else array
        hwc = hwc if hwc.ndim == 3 else hwc[..., None]
        want = hwc if dtype == "uint8" else expected_pixels(hwc)
        image = Image.open(io.BytesIO(row["image"]))
        assert image.mode == mode
        np.testing.assert_array_equal(np.asarray(image), want[..., 0] if mode == "L" else want)


def test_plain_nested_lists_in_parquet_reject_bad_rows_with_the_reason(tmp_path):
    """No datasets metadata: shapes are known per row only, so bad rows are rejected."""
    good = [np.arange(SIDE * SIDE * 3, dtype=np.float64).reshape(SIDE, SIDE, 3) for _ in range(2)]
    good[1] = good[1][::-1].copy()
    ragged = [[[1.0, 2.0, 3.0]] * SIDE] * (SIDE - 1) + [[[1.0, 2.0, 3.0]] * (SIDE - 1)]
    bands = np.zeros((5, 4, 4)).tolist()
    image = pa.array(
        [good[0].tolist(), ragged, bands, None, good[1].tolist(), good[0].tolist()],
        pa.list_(pa.list_(pa.list_(pa.float64()))),
    )
    line = [[float(v)] for v in range(LENGTH)]
    signal = pa.array(
        [line, line, line, line, [[1.0, 2.0]] * 3, [[float(v) for v in range(LENGTH)]]],
        pa.list_(pa.list_(pa.float32())),
    )
    folder = tmp_path / "shards"
    folder.mkdir()
    pq.write_table(pa.table({"pixels": image, "trace": signal}), folder / "rows.parquet")
    result = ingest_images([str(folder)], str(tmp_path / "out"), settings())
    assert (result.images, result.rejected) == (2, 4)
    source = f"{folder}::rows/"
    assert rejected(tmp_path / "out") == {
        source + "1": "the image array is ragged: its dimension 2 varies in length from 11 to 12",
        source + "2": "the image array holds arrays of shape 5x4x4; a picture is 2-D (one band) "
        "or 3-D with 1 or 3 bands first or last (HWC or CHW); keep three bands first "
        "(datasets' map) or store encoded images",
        source + "3": "the image cell is empty",
        source + "4": "signal 'trace' has shape 3x2; a signal is 1-D",
    }
    rows = datasets.read_table(str(tmp_path / "out"), "images").to_pylist()
    assert [row["source"] for row in rows] == [source + "0", source + "5"]
    for row in rows:
        np.testing.assert_array_equal(decoded(row["image"]), expected_pixels(good[0]))
        assert row["trace"] == [float(v) for v in range(LENGTH)]


def test_nested_fixed_size_lists_are_arrays_with_a_declared_shape(tmp_path):
    pixels = np.random.default_rng(3).integers(0, 256, size=(2, 4, 5), dtype=np.uint8)
    kind = pa.list_(pa.list_(pa.uint8(), 5), 4)
    folder = tmp_path / "grey"
    folder.mkdir()
    table = pa.table({"image": pa.array([p.tolist() for p in pixels], kind)})
    pq.write_table(table.slice(1), folder / "rows.parquet")  # a sliced column
    ingest_images([str(folder)], str(tmp_path / "out"), settings())
    (row,) = datasets.read_table(str(tmp_path / "out"), "images").to_pylist()
    assert Image.open(io.BytesIO(row["image"])).mode == "L"
    np.testing.assert_array_equal(decoded(row["image"]), pixels[1])


def test_declared_shapes_that_make_no_picture_or_signal_are_one_line_errors(tmp_path, capsys):
    import datasets as hf

    bands = hf.Features({"image": hf.Array3D(shape=(5, 8, 8), dtype="float32")})
    zeros = np.zeros((1, 5, 8, 8), np.float32)
    hf.Dataset.from_dict({"image": zeros}, features=bands).save_to_disk(str(tmp_path / "bands"))
    capsys.readouterr()
    code = main(["ingest", str(tmp_path / "bands"), "--out", str(tmp_path / "o1"),
                 "--workers", "1"])  # fmt: skip
    err = capsys.readouterr().err.strip()
    assert code == 1
    assert err == (
        f"embedpipe ingest: error: {tmp_path / 'bands'}: image column 'image' holds arrays of "
        "shape 5x8x8; a picture is 2-D (one band) or 3-D with 1 or 3 bands first or last "
        "(HWC or CHW); keep three bands first (datasets' map) or store encoded images"
    )
    wide = hf.Features(
        {
            "image": hf.Array3D(shape=(8, 8, 3), dtype="float32"),
            "spectrum": hf.Array2D(shape=(LENGTH, 2), dtype="float32"),
        }
    )
    rows = {"image": np.zeros((1, 8, 8, 3), np.float32), "spectrum": np.zeros((1, LENGTH, 2))}
    hf.Dataset.from_dict(rows, features=wide).save_to_disk(str(tmp_path / "wide"))
    with pytest.raises(SignalError, match=r"column 'spectrum' holds 2-D arrays of shape 40x2"):
        ingest_images([str(tmp_path / "wide")], str(tmp_path / "o2"), settings())
    astroclip_like(3)[0].save_to_disk(str(tmp_path / "astro"))
    with pytest.raises(SignalError, match=r"'spectrum' declares 40 values per row, but signal_"):
        ingest_images([str(tmp_path / "astro")], str(tmp_path / "o3"), settings(signal_length=8))


def test_shapes_declared_in_parquet_metadata_count_without_datasets_imported():
    """What pyarrow reads from a datasets Parquet shard when datasets is not imported."""
    from embedpipe.data.nested_arrays import declared_shape
    from embedpipe.data.signals import columns_of

    def field(shape):
        metadata = {
            b"ARROW:extension:name": b"datasets.features.features.Array2DExtensionType",
            b"ARROW:extension:metadata": f'[{list(shape)}, "float32"]'.encode(),
        }
        return pa.field("spectrum", pa.list_(pa.list_(pa.float32())), metadata=metadata)

    assert declared_shape(field((LENGTH, 1))) == (LENGTH, 1)
    (column,) = columns_of(pa.schema([field((1, LENGTH))]), "shard", (), None, 0)
    assert (column.scalar, column.length) == (False, LENGTH)
    with pytest.raises(SignalError, match=r"^shard: column 'spectrum' holds 2-D arrays of shape"):
        columns_of(pa.schema([field((LENGTH, 3))]), "shard", (), None, 0)
