"""Signals joined per image at ingest: side tables (Parquet, CSV; by image_id or source),
Hugging Face dataset folders, rejections with reasons, and one-line errors."""

import hashlib
import io
import json

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from conftest import flat_tree, png_bytes, upload_tree, write_tree
from PIL import Image

from embedpipe.cli import main
from embedpipe.config import IngestSettings
from embedpipe.core import datasets
from embedpipe.core.schemas import IMAGES_SCHEMA
from embedpipe.data.ingest import REJECTED_NAME, REPORT_NAME, ingest_images
from embedpipe.data.signals import SignalError
from embedpipe.data.sources import LayoutError

LENGTH = 16


def settings(**changes) -> IngestSettings:
    return IngestSettings(workers=1, **changes)


def relative_paths(root) -> list[str]:
    return sorted(str(p.relative_to(root)) for p in root.rglob("*.jpg"))


def spectrum(seed: int, length: int = LENGTH) -> list[float]:
    return np.random.default_rng(seed).normal(size=length).astype(np.float32).tolist()


def rejected(out) -> dict[str, str]:
    table = pq.read_table(datasets.side_path(str(out), REJECTED_NAME)).to_pylist()
    return {row["source"]: row["reason"] for row in table}


def by_source(out) -> dict[str, dict]:
    table = datasets.read_table(str(out), "images")
    return {row["source"]: row for row in table.to_pylist()}


@pytest.fixture
def tree(tmp_path):
    return flat_tree(tmp_path / "src", categories=2, concepts=2, images=3)


def signal_table(paths: list[str], spectrum_type: pa.DataType | None = None) -> pa.Table:
    spectrum_type = spectrum_type or pa.list_(pa.float32())
    return pa.table(
        {
            "source": paths,
            "spectrum": pa.array([spectrum(i) for i in range(len(paths))], spectrum_type),
            "redshift": pa.array([0.1 * i for i in range(len(paths))], pa.float64()),
            "stellar_mass": pa.array([9.0 + i for i in range(len(paths))], pa.float32()),
        }
    )


def test_parquet_table_joined_by_source_keeps_list_float32_columns(tree, tmp_path):
    paths = relative_paths(tree)
    pq.write_table(signal_table(paths), tmp_path / "signals.parquet")
    config = settings(signals=str(tmp_path / "signals.parquet"), signal_key="source")
    result = ingest_images([str(tree)], str(tmp_path / "out"), config)
    assert (result.images, result.rejected) == (12, 0)
    table = datasets.read_table(str(tmp_path / "out"), "images")
    assert table.schema.names == [*IMAGES_SCHEMA.names, "spectrum", "redshift", "stellar_mass"]
    assert table.schema.field("spectrum").type == pa.list_(pa.float32())
    assert table.schema.field("redshift").type == pa.float64()
    assert table.schema.field("stellar_mass").type == pa.float64()
    rows = by_source(tmp_path / "out")
    for i, path in enumerate(paths):
        row = rows[str(tree / path)]
        np.testing.assert_array_equal(np.float32(row["spectrum"]), np.float32(spectrum(i)))
        assert row["redshift"] == pytest.approx(0.1 * i)
        assert row["stellar_mass"] == pytest.approx(9.0 + i)
    manifest = datasets.read_manifest(str(tmp_path / "out"))
    assert manifest["signals"]["columns"] == {
        "spectrum": {"kind": "signal", "length": None},
        "redshift": {"kind": "scalar"},
        "stellar_mass": {"kind": "scalar"},
    }
    assert manifest["signals"]["table_rows_matched"] == 12


def test_csv_table_joined_by_image_id_with_json_array_cells(tree, tmp_path):
    paths = relative_paths(tree)
    ids = [hashlib.sha256((tree / p).read_bytes()).hexdigest() for p in paths]
    lines = ["image_id,spectrum,redshift"]
    for i, image_id in enumerate(ids):
        lines.append(f'{image_id},"{json.dumps(spectrum(i))}",{0.5 + i}')
    (tmp_path / "signals.csv").write_text("\n".join(lines) + "\n")
    config = settings(signals=str(tmp_path / "signals.csv"), signal_length=LENGTH)
    result = ingest_images([str(tree)], str(tmp_path / "out"), config)
    assert (result.images, result.rejected) == (12, 0)
    table = datasets.read_table(str(tmp_path / "out"), "images")
    assert table.schema.field("spectrum").type == pa.list_(pa.float32())
    assert table.schema.field("redshift").type == pa.float64()
    got = {row["image_id"]: row for row in table.to_pylist()}
    for i, image_id in enumerate(ids):
        np.testing.assert_allclose(got[image_id]["spectrum"], spectrum(i), rtol=1e-6)
        assert got[image_id]["redshift"] == 0.5 + i


def test_bad_rows_are_rejected_with_the_reason_and_the_run_goes_on(tree, tmp_path):
    paths = relative_paths(tree)
    spectra = [spectrum(i) for i in range(len(paths))]
    spectra[0] = None  # missing
    spectra[1] = [*spectra[1][:-1], float("nan")]  # non-finite
    spectra[2] = spectra[2][:5]  # wrong length
    spectra[3] = [1e39] * LENGTH  # past float32's range: infinite
    redshift = [0.1] * len(paths)
    redshift[4] = float("inf")
    redshift[5] = None  # an unknown target is kept, as null
    table = pa.table(
        {
            "source": paths[1:],  # the first image has no row at all
            "spectrum": pa.array(spectra[1:], pa.list_(pa.float64())),
            "redshift": pa.array(redshift[1:], pa.float64()),
        }
    )
    pq.write_table(table, tmp_path / "s.parquet")
    config = settings(signals=str(tmp_path / "s.parquet"), signal_key="source", signal_length=16)
    result = ingest_images([str(tree)], str(tmp_path / "out"), config)
    assert (result.images, result.rejected) == (7, 5)
    reasons = rejected(tmp_path / "out")
    assert reasons[str(tree / paths[0])] == (
        f"no row in signals table {tmp_path / 's.parquet'} with source = {paths[0]!r}"
    )
    assert reasons[str(tree / paths[1])].startswith("signal 'spectrum' has 1 non-finite value(s)")
    assert reasons[str(tree / paths[2])] == "signal 'spectrum' has 5 values, expected 16"
    assert "16 non-finite value(s)" in reasons[str(tree / paths[3])]
    assert reasons[str(tree / paths[4])] == "scalar 'redshift' is not finite (inf)"
    assert by_source(tmp_path / "out")[str(tree / paths[5])]["redshift"] is None
    report = json.loads((tmp_path / "out" / ".embedpipe" / REPORT_NAME).read_text())
    assert report["signals"]["table_rows"] == 11 and report["signals"]["table_rows_matched"] == 11


def test_a_null_signal_cell_is_rejected_as_missing(tree, tmp_path):
    paths = relative_paths(tree)
    spectra = [spectrum(i) for i in range(len(paths))]
    spectra[3] = None
    table = pa.table({"source": paths, "spectrum": pa.array(spectra, pa.list_(pa.float32()))})
    pq.write_table(table, tmp_path / "s.parquet")
    config = settings(signals=str(tmp_path / "s.parquet"), signal_key="source")
    ingest_images([str(tree)], str(tmp_path / "out"), config)
    assert rejected(tmp_path / "out") == {str(tree / paths[3]): "signal 'spectrum' is missing"}


def test_fixed_size_list_declares_the_length(tree, tmp_path):
    paths = relative_paths(tree)
    table = signal_table(paths, pa.list_(pa.float32(), LENGTH))
    pq.write_table(table, tmp_path / "s.parquet")
    config = settings(signals=str(tmp_path / "s.parquet"), signal_key="source")
    ingest_images([str(tree)], str(tmp_path / "out"), config)
    out = datasets.read_table(str(tmp_path / "out"), "images")
    assert out.schema.field("spectrum").type == pa.list_(pa.float32())
    manifest = datasets.read_manifest(str(tmp_path / "out"))
    assert manifest["signals"]["columns"]["spectrum"] == {"kind": "signal", "length": LENGTH}
    with pytest.raises(SignalError, match="declares 16 values per row, but signal_length is 8"):
        ingest_images(
            [str(tree)], str(tmp_path / "o2"), config.model_copy(update={"signal_length": 8})
        )


def test_signal_columns_selects_what_is_attached(tree, tmp_path):
    paths = relative_paths(tree)
    table = signal_table(paths).append_column("note", pa.array(["x"] * len(paths)))
    pq.write_table(table, tmp_path / "s.parquet")
    config = settings(
        signals=str(tmp_path / "s.parquet"), signal_key="source", signal_columns=("redshift",)
    )
    ingest_images([str(tree)], str(tmp_path / "out"), config)
    names = datasets.read_table(str(tmp_path / "out"), "images").schema.names
    assert names == [*IMAGES_SCHEMA.names, "redshift"]


@pytest.mark.parametrize(
    ("column", "message"),
    [
        (pa.array(["a"] * 12), r"column 'spectrum' is string; a signal column holds numbers"),
        (
            pa.array([[[[1.0]]]] * 12, pa.list_(pa.list_(pa.list_(pa.float32())))),
            r"column 'spectrum' is list<\w+: list<\w+: list<\w+: float>>> \(nested lists\)",
        ),
        (
            pa.array([[[1.0, 2.0]] * 3] * 12, pa.list_(pa.list_(pa.float32(), 2), 3)),
            r"column 'spectrum' holds 2-D arrays of shape 3x2; a signal is 1-D",
        ),
    ],
)
def test_a_signal_column_of_the_wrong_type_is_one_line_naming_file_and_column(
    tree, tmp_path, column, message
):
    table = pa.table({"source": relative_paths(tree), "spectrum": column})
    pq.write_table(table, tmp_path / "s.parquet")
    config = settings(signals=str(tmp_path / "s.parquet"), signal_key="source")
    with pytest.raises(SignalError, match=f"^{tmp_path / 's.parquet'}: {message}"):
        ingest_images([str(tree)], str(tmp_path / "out"), config)


def test_table_errors_are_one_line_naming_file_column_and_key(tree, tmp_path, capsys):
    paths = relative_paths(tree)
    table = pa.table({"source": [*paths, paths[4]], "redshift": [0.0] * 13})
    pq.write_table(table, tmp_path / "dup.parquet")
    out = str(tmp_path / "out")
    code = main(["ingest", str(tree), "--out", out, "--signals", str(tmp_path / "dup.parquet"),
                 "--signal-key", "source", "--workers", "1"])  # fmt: skip
    assert code == 1
    err = capsys.readouterr().err.strip()
    assert err == (
        f"embedpipe ingest: error: {tmp_path / 'dup.parquet'}: key {paths[4]!r} appears twice "
        "in column 'source' (rows 4 and 12)"
    )
    code = main(["ingest", str(tree), "--out", out, "--signals", str(tmp_path / "dup.parquet"),
                 "--workers", "1"])  # fmt: skip
    err = capsys.readouterr().err.strip()
    assert code == 1 and err == (
        f"embedpipe ingest: error: {tmp_path / 'dup.parquet'}: no key column 'image_id' "
        "(signal_key = image_id); the table has source, redshift"
    )
    unmatched = pa.table({"source": ["elsewhere/a.jpg", "elsewhere/b.jpg"], "redshift": [1.0, 2.0]})
    pq.write_table(unmatched, tmp_path / "other.parquet")
    code = main(["ingest", str(tree), "--out", out, "--signals", str(tmp_path / "other.parquet"),
                 "--signal-key", "source", "--workers", "1"])  # fmt: skip
    err = capsys.readouterr().err.strip()
    assert code == 1 and "\n" not in err
    assert err.startswith(
        f"embedpipe ingest: error: {tmp_path / 'other.parquet'}: no row matches an ingested "
        "image on key column 'source' (first key 'elsewhere/a.jpg')"
    )
    assert not (tmp_path / "out" / ".embedpipe" / "manifest.json").exists()


def test_csv_cells_that_are_not_flat_number_arrays_name_the_line(tree, tmp_path):
    paths = relative_paths(tree)
    lines = ["source,spectrum"] + [f'{p},"[1, 2]"' for p in paths]
    lines[3] = f'{paths[2]},"[[1], [2]]"'
    (tmp_path / "s.csv").write_text("\n".join(lines) + "\n")
    config = settings(signals=str(tmp_path / "s.csv"), signal_key="source")
    with pytest.raises(SignalError, match=r"s\.csv, line 4: column 'spectrum' must hold a flat"):
        ingest_images([str(tree)], str(tmp_path / "out"), config)


def image_bytes(index: int, fmt: str = "PNG") -> bytes:
    buffer = io.BytesIO()
    Image.new("RGB", (20, 16), (10 * index % 256, 100, 200)).save(buffer, fmt)
    return buffer.getvalue()


def hf_rows(count: int) -> dict:
    return {
        "image": [image_bytes(i) for i in range(count)],
        "spectrum": [spectrum(i, 8) for i in range(count)],
        "redshift": [0.01 * i for i in range(count)],
        "category": ["galaxy"] * count,
        "concept": [f"obj{i // 2}" for i in range(count)],
    }


def test_hugging_face_save_to_disk_folder_streams_images_and_signals(tmp_path):
    import datasets as hf

    rows = hf_rows(10)
    rows["spectrum"][3] = [*rows["spectrum"][3][:7], float("inf")]
    features = hf.Features(
        {
            "image": hf.Image(),
            "spectrum": hf.Sequence(hf.Value("float32"), length=8),
            "redshift": hf.Value("float64"),
            "category": hf.Value("string"),
            "concept": hf.Value("string"),
        }
    )
    dataset = hf.Dataset.from_dict(
        {**rows, "image": [{"bytes": b, "path": None} for b in rows["image"]]}, features=features
    )
    dataset.save_to_disk(str(tmp_path / "hf"))
    result = ingest_images([str(tmp_path / "hf")], str(tmp_path / "out"), settings())
    assert (result.images, result.rejected) == (9, 1)
    table = datasets.read_table(str(tmp_path / "out"), "images")
    assert table.schema.names == [*IMAGES_SCHEMA.names, "spectrum", "redshift"]
    assert table.schema.field("spectrum").type == pa.list_(pa.float32())
    got = {row["source"]: row for row in table.to_pylist()}
    for i in (0, 4, 9):
        row = got[f"{tmp_path / 'hf'}::rows/{i}"]
        assert row["image"] == rows["image"][i]
        assert (row["category"], row["concept"]) == ("galaxy", f"obj{i // 2}")
        np.testing.assert_array_equal(np.float32(row["spectrum"]), np.float32(spectrum(i, 8)))
        assert row["redshift"] == pytest.approx(0.01 * i)
    assert datasets.read_manifest(str(tmp_path / "out"))["signals"]["columns"]["spectrum"] == {
        "kind": "signal",
        "length": 8,
    }
    assert list(rejected(tmp_path / "out").values()) == [
        "signal 'spectrum' has 1 non-finite value(s) (first at index 7: inf)"
    ]


def test_hugging_face_dataset_dict_fills_the_split_and_casts_image_column(tmp_path):
    import datasets as hf

    train = hf.Dataset.from_dict(hf_rows(4)).cast_column("image", hf.Image())
    test = hf.Dataset.from_dict(hf_rows(6)).select(range(4, 6)).cast_column("image", hf.Image())
    hf.DatasetDict({"train": train, "test": test}).save_to_disk(str(tmp_path / "hf"))
    ingest_images([str(tmp_path / "hf")], str(tmp_path / "out"), settings())
    table = datasets.read_table(str(tmp_path / "out"), "images").to_pylist()
    assert sorted(row["split"] for row in table) == ["test"] * 2 + ["train"] * 4
    assert {row["source"].split("::")[1] for row in table if row["split"] == "test"} == {
        "test/0",
        "test/1",
    }


def test_hugging_face_parquet_shards_with_raw_bytes_and_a_side_table(tmp_path):
    rows = hf_rows(6)
    folder = tmp_path / "hub" / "data"
    folder.mkdir(parents=True)
    table = pa.table({"image": rows["image"], "redshift": rows["redshift"]})
    pq.write_table(table.slice(0, 4), folder / "train-00000-of-00002.parquet")
    pq.write_table(table.slice(4), folder / "train-00001-of-00002.parquet")
    (tmp_path / "hub" / "README.md").write_text("a dataset card\n")
    ids = [hashlib.sha256(b).hexdigest() for b in rows["image"]]
    side = pa.table({"image_id": ids, "spectrum": [spectrum(i) for i in range(6)]})
    pq.write_table(side, tmp_path / "side.parquet")
    config = settings(signals=str(tmp_path / "side.parquet"))
    result = ingest_images([str(tmp_path / "hub")], str(tmp_path / "out"), config)
    assert (result.images, result.rejected) == (6, 0)
    out = datasets.read_table(str(tmp_path / "out"), "images")
    assert out.schema.names == [*IMAGES_SCHEMA.names, "spectrum", "redshift"]
    got = out.to_pylist()
    assert [row["split"] for row in got] == ["train"] * 6
    assert [row["category"] for row in got] == ["hub"] * 6
    assert [row["image"] for row in got] == rows["image"]
    np.testing.assert_allclose(got[5]["spectrum"], spectrum(5), rtol=1e-6)


def test_a_hugging_face_folder_without_images_is_refused_by_name(tmp_path):
    import datasets as hf

    hf.Dataset.from_dict({"image": ["a.png"], "redshift": [0.1]}).save_to_disk(str(tmp_path / "hf"))
    with pytest.raises(LayoutError, match=r"column 'image' is string; ingest reads encoded"):
        ingest_images([str(tmp_path / "hf")], str(tmp_path / "out"), settings())


def test_images_without_signals_keep_the_plain_contract(tmp_path):
    root = write_tree(tmp_path / "src", {"c/k/a.png": png_bytes()})
    ingest_images([str(root)], str(tmp_path / "out"), settings())
    assert datasets.read_table(str(tmp_path / "out"), "images").schema.equals(IMAGES_SCHEMA)


def test_s3_sources_and_tables_join_by_source_and_hub_shards_stream(tree, tmp_path, bucket):
    paths = relative_paths(tree)
    pq.write_table(signal_table(paths), tree / "signals.parquet")
    rows = hf_rows(3)
    hub = tmp_path / "hub"
    (hub / "data").mkdir(parents=True)
    pq.write_table(pa.table({"image": rows["image"]}), hub / "data" / "test-00000.parquet")
    source = upload_tree(tree, bucket, "src")
    hub_uri = upload_tree(hub, bucket, "hub")
    side = pa.table({"source": [f"test/{i}" for i in range(3)], "redshift": [1.0, 2.0, 3.0]})
    pq.write_table(side, tmp_path / "hub-side.parquet")
    hub_signals = upload_tree(tmp_path, bucket, "tables") + "/hub-side.parquet"
    config = settings(signals=f"{source}/signals.parquet", signal_key="source")
    result = ingest_images([source], f"s3://{bucket}/out", config)
    assert (result.images, result.rejected) == (12, 0)
    got = {row["source"]: row for row in datasets.read_table(f"s3://{bucket}/out").to_pylist()}
    assert got[f"{source}/{paths[7]}"]["redshift"] == pytest.approx(0.7)
    config = settings(signals=hub_signals, signal_key="source")
    ingest_images([hub_uri], f"s3://{bucket}/hub-out", config)
    out = datasets.read_table(f"s3://{bucket}/hub-out").to_pylist()
    assert [(row["split"], row["redshift"]) for row in out] == [
        ("test", 1.0),
        ("test", 2.0),
        ("test", 3.0),
    ]


@pytest.mark.parametrize(
    "kind",
    [
        pa.list_(pa.float32()),
        pa.list_(pa.float64()),
        pa.large_list(pa.int32()),
        pa.list_(pa.float32(), 3),
    ],
)
def test_column_values_of_sliced_arrays_match_pyarrows_own_rows(kind):
    from embedpipe.data.signals import ColumnValues

    rows = [[1, 2, 3], None, [4, 5, 6], [7, None, 9], [10, 11, 12]]
    array = pa.array(rows, kind).slice(1, 4)
    values = ColumnValues(pa.chunked_array([array]), scalar=False)
    for index, expected in enumerate(array.to_pylist()):
        got = values.value(index)
        if expected is None:
            assert got is None
            continue
        assert got.dtype == np.float32
        np.testing.assert_array_equal(got, np.array(expected, dtype=np.float64).astype(np.float32))


def test_columns_named_like_image_columns_are_left_out_unless_selected(tree, tmp_path):
    paths = relative_paths(tree)
    ids = [hashlib.sha256((tree / p).read_bytes()).hexdigest() for p in paths]
    table = pa.table({"image_id": ids, "source": paths, "width": [1] * 12, "redshift": [0.5] * 12})
    pq.write_table(table, tmp_path / "s.parquet")
    config = settings(signals=str(tmp_path / "s.parquet"))
    ingest_images([str(tree)], str(tmp_path / "out"), config)
    out = datasets.read_table(str(tmp_path / "out"), "images")
    assert out.schema.names == [*IMAGES_SCHEMA.names, "redshift"]
    assert out.column("width").to_pylist() != [1] * 12
    with pytest.raises(SignalError, match=r"s\.parquet: column 'width' has the name of an images"):
        ingest_images([str(tree)], str(tmp_path / "o2"), settings(signals=config.signals,
                      signal_columns=("width", "redshift")))  # fmt: skip
    with pytest.raises(
        SignalError, match=r"signal_columns: 'mass' is not a column of .*s\.parquet"
    ):
        ingest_images([str(tree)], str(tmp_path / "o3"), settings(signals=config.signals,
                      signal_columns=("mass",)))  # fmt: skip
