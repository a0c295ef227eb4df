"""Merging the parts of a fan-out: shards linked or copied server-side, never rewritten."""

import os

import pyarrow as pa

from embedpipe.core import datasets, storage


def _write_parts(base: str) -> list[str]:
    parts = []
    for number, ids in enumerate((["a", "b", "c"], [], ["d", "e"])):
        uri = storage.join(base, f"part{number}")
        table = pa.table({"image_id": pa.array(ids, pa.string()), "x": pa.array(range(len(ids)))})
        datasets.write_table(uri, table, "selection", extra={"model": "m"}, rows_per_shard=2)
        parts.append(uri)
    return parts


def test_local_merge_links_the_non_empty_shards_in_order(tmp_path):
    parts = _write_parts(str(tmp_path))
    manifest = datasets.merge_datasets(parts, str(tmp_path / "merged"), "selection")
    merged = datasets.read_table(str(tmp_path / "merged"), "selection")
    assert merged.column("image_id").to_pylist() == ["a", "b", "c", "d", "e"]
    assert manifest["model"] == "m" and manifest["merged_parts"] == 3
    assert [s["rows"] for s in manifest["shards"]] == [2, 1, 2]
    first_source = datasets.shard_uris(parts[0], datasets.read_manifest(parts[0]))[0]
    first_merged = datasets.shard_uris(str(tmp_path / "merged"), manifest)[0]
    assert os.stat(first_source).st_ino == os.stat(first_merged).st_ino  # a link, not a copy


def test_merging_only_empty_parts_keeps_a_schema(tmp_path):
    table = pa.table({"image_id": pa.array([], pa.string())})
    datasets.write_table(str(tmp_path / "p"), table, "selection")
    datasets.merge_datasets([str(tmp_path / "p")], str(tmp_path / "m"), "selection")
    assert datasets.read_table(str(tmp_path / "m")).schema.names == ["image_id"]


def test_s3_merge_copies_server_side(bucket):
    parts = _write_parts(f"s3://{bucket}/parts")
    out = f"s3://{bucket}/merged"
    datasets.merge_datasets(parts, out, "selection")
    assert datasets.read_table(out).column("image_id").to_pylist() == ["a", "b", "c", "d", "e"]
    assert storage.copy_file(f"{parts[0]}/.embedpipe/manifest.json", f"{out}/x") == "server-side"
