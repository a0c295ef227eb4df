import hashlib
import io
import tarfile
from pathlib import Path

import pyarrow.parquet as pq
import pytest
from conftest import flat_tree, jpeg_bytes, png_bytes, upload_tree, write_tree

from embedpipe.config import IngestSettings
from embedpipe.core import datasets, storage
from embedpipe.core.schemas import IMAGES_SCHEMA
from embedpipe.data.ingest import REJECTED_NAME, REPORT_NAME, ingest_images
from embedpipe.data.sources import LayoutError

KEY_COLUMNS = ["image_id", "category", "concept", "split", "width", "height"]


def rows(uri, columns=KEY_COLUMNS):
    return datasets.read_table(uri, "images", columns=columns).to_pylist()


def rejected(uri):
    return pq.read_table(datasets.side_path(str(uri), REJECTED_NAME)).to_pylist()


def make_tar(path: Path, members: dict[str, bytes], mode="w") -> Path:
    with tarfile.open(path, mode) as tar:
        for name, data in members.items():
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    return path


def test_flat_folder_rows_follow_the_data_contract(tmp_path, one_worker):
    files = {
        "mugs/red_mug/a.jpg": jpeg_bytes((200, 0, 0), (40, 30)),
        "mugs/red_mug/b.png": png_bytes((0, 200, 0), (24, 36)),
        "mugs/blue_mug/c.JPG": jpeg_bytes((0, 0, 200), (50, 20)),
    }
    root = write_tree(tmp_path / "src", files)
    result = ingest_images([str(root)], str(tmp_path / "out"), one_worker)
    table = datasets.read_table(str(tmp_path / "out"), "images")
    assert table.schema.equals(IMAGES_SCHEMA)
    assert (result.images, result.rejected, result.shards) == (3, 0, 1)
    by_source = {row["source"]: row for row in table.to_pylist()}
    for relative, data in files.items():
        row = by_source[str(root / relative)]
        assert row["image"] == data
        assert row["image_id"] == hashlib.sha256(data).hexdigest()
        assert (row["category"], row["concept"]) == tuple(relative.split("/")[:2])
        assert row["split"] is None
    assert (
        by_source[str(root / "mugs/blue_mug/c.JPG")]["width"],
        by_source[str(root / "mugs/blue_mug/c.JPG")]["height"],
    ) == (50, 20)


def test_demo_dataset_corrupt_files_are_reported_not_fatal(demo_dir, tmp_path, one_worker):
    result = ingest_images([str(demo_dir)], str(tmp_path / "out"), one_worker)
    assert result.images == 4 * 5 * 20 + 8
    assert result.distinct_images == result.images - 4  # the exact copies share an id
    assert result.rejected == 3
    assert result.skipped_non_image == 1  # demo_manifest.json
    reasons = {Path(r["source"]).name: r["reason"] for r in rejected(tmp_path / "out")}
    assert set(reasons) == {"truncated.jpg", "noise.jpg", "empty.png"}
    assert all(reason.startswith("cannot decode image") for reason in reasons.values())
    assert {row["split"] for row in rows(str(tmp_path / "out"))} == {"train", "test"}
    report = storage.read_json(datasets.side_path(str(tmp_path / "out"), REPORT_NAME))
    assert report["rejected"] == 3 and len(report["rejected_examples"]) == 3


def test_ingest_is_idempotent_down_to_the_bytes(demo_dir, tmp_path, one_worker):
    first = ingest_images([str(demo_dir)], str(tmp_path / "a"), one_worker)
    second = ingest_images([str(demo_dir)], str(tmp_path / "b"), one_worker)
    assert rows(first.out_uri) == rows(second.out_uri)
    manifest_a = datasets.read_manifest(first.out_uri)
    assert manifest_a["shards"] == datasets.read_manifest(second.out_uri)["shards"]
    for shard in manifest_a["shards"]:
        a = (tmp_path / "a" / shard["path"]).read_bytes()
        assert a == (tmp_path / "b" / shard["path"]).read_bytes()


def test_process_pool_gives_the_same_rows_as_one_worker(demo_dir, tmp_path, one_worker):
    inline = ingest_images([str(demo_dir)], str(tmp_path / "a"), one_worker)
    pooled = ingest_images([str(demo_dir)], str(tmp_path / "b"), IngestSettings(workers=2))
    assert rows(inline.out_uri, None) == rows(pooled.out_uri, None)
    assert pooled.rejected == inline.rejected


def test_shards_are_cut_at_the_configured_size(demo_dir, tmp_path):
    config = IngestSettings(workers=1, rows_per_shard=50, row_group_rows=16)
    result = ingest_images([str(demo_dir)], str(tmp_path / "out"), config)
    manifest = datasets.read_manifest(result.out_uri)
    assert [s["rows"] for s in manifest["shards"]] == [50] * 8 + [8]
    assert result.shards == 9
    first = pq.ParquetFile(str(tmp_path / "out" / manifest["shards"][0]["path"]))
    assert first.metadata.num_row_groups == 4  # 16 + 16 + 16 + 2


def test_rewrite_removes_stale_shards(demo_dir, tmp_path, one_worker):
    out = tmp_path / "out"
    ingest_images([str(demo_dir)], str(out), IngestSettings(workers=1, rows_per_shard=100))
    ingest_images([str(demo_dir)], str(out), one_worker)
    assert sorted(p.name for p in out.glob("part-*")) == [
        s["path"] for s in datasets.read_manifest(str(out))["shards"]
    ]


def test_rewrite_leaves_datasets_in_subfolders_alone(tmp_path):
    import pyarrow as pa

    nested = datasets.write_table(str(tmp_path / "out" / "inner"), pa.table({"x": [1]}), "t")
    datasets.write_table(str(tmp_path / "out"), pa.table({"y": [2]}), "t")
    assert datasets.read_table(str(tmp_path / "out" / "inner")).column("x").to_pylist() == [1]
    assert (tmp_path / "out" / "inner" / nested["shards"][0]["path"]).is_file()


@pytest.mark.parametrize("mode,suffix", [("w", ".tar"), ("w:gz", ".tar.gz")])
def test_tar_archives_give_the_same_images_as_the_folder(tmp_path, one_worker, mode, suffix):
    root = flat_tree(tmp_path / "src")
    members = {p.relative_to(root).as_posix(): p.read_bytes() for p in sorted(root.rglob("*.jpg"))}
    archive = make_tar(tmp_path / f"images{suffix}", members, mode)
    from_dir = ingest_images([str(root)], str(tmp_path / "dir"), one_worker)
    from_tar = ingest_images([str(archive)], str(tmp_path / "tar"), one_worker)
    assert sorted(map(str, rows(from_dir.out_uri))) == sorted(map(str, rows(from_tar.out_uri)))
    sources = [r["source"] for r in rows(from_tar.out_uri, ["source"])]
    assert sources[0] == f"{archive}::cat0/concept0/img00.jpg"


def test_unsafe_tar_members_are_rejected_and_never_written(tmp_path, one_worker):
    archive = tmp_path / "evil.tar"
    with tarfile.open(archive, "w") as tar:
        for name in ("../escape/c/x.jpg", "/abs/c/x.jpg", "good/concept/ok.jpg"):
            data = jpeg_bytes()
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
        link = tarfile.TarInfo("good/concept/link.jpg")
        link.type, link.linkname = tarfile.SYMTYPE, "/etc/passwd"
        tar.addfile(link)
        hard = tarfile.TarInfo("good/concept/hard.jpg")
        hard.type, hard.linkname = tarfile.LNKTYPE, "good/concept/ok.jpg"
        tar.addfile(hard)
    before = set(tmp_path.parent.rglob("*"))
    result = ingest_images([str(archive)], str(tmp_path / "out"), one_worker)
    assert result.images == 1
    reasons = {r["source"].split("::")[1]: r["reason"] for r in rejected(tmp_path / "out")}
    assert reasons["../escape/c/x.jpg"].startswith("member path climbs out")
    assert reasons["/abs/c/x.jpg"].startswith("absolute path")
    assert reasons["good/concept/link.jpg"].startswith("link member")
    assert reasons["good/concept/hard.jpg"].startswith("link member")
    created = set(tmp_path.parent.rglob("*")) - before
    assert all(str(p).startswith(str(tmp_path / "out")) for p in created)


def test_truncated_archive_keeps_what_was_read(tmp_path, one_worker):
    members = {f"cat/concept/{i:02d}.jpg": jpeg_bytes((i * 20, 0, 0), (64, 64)) for i in range(10)}
    archive = make_tar(tmp_path / "full.tar", members)
    data = archive.read_bytes()
    (tmp_path / "cut.tar").write_bytes(data[: len(data) // 2])
    result = ingest_images([str(tmp_path / "cut.tar")], str(tmp_path / "out"), one_worker)
    assert 0 < result.images < 10
    assert rejected(tmp_path / "out")[-1]["reason"].startswith("archive is truncated")


def test_s3_prefix_in_s3_dataset_out(demo_dir, bucket, tmp_path, one_worker):
    subset = tmp_path / "subset"
    for path in sorted(demo_dir.rglob("*"))[:40]:
        if path.is_file():
            target = subset / path.relative_to(demo_dir)
            target.parent.mkdir(parents=True, exist_ok=True)
            target.write_bytes(path.read_bytes())
    prefix = upload_tree(subset, bucket, "raw/perva")
    local = ingest_images([str(subset)], str(tmp_path / "local"), one_worker)
    remote = ingest_images([prefix], f"s3://{bucket}/datasets/images", one_worker)
    assert rows(remote.out_uri) == rows(local.out_uri)
    first = rows(remote.out_uri, ["source"])[0]["source"]
    assert first.startswith(f"s3://{bucket}/raw/perva/")


def test_tar_archive_on_s3_is_streamed(tmp_path, bucket, one_worker):
    root = flat_tree(tmp_path / "src", categories=1, concepts=2, images=3)
    members = {p.relative_to(root).as_posix(): p.read_bytes() for p in sorted(root.rglob("*.jpg"))}
    archive = make_tar(tmp_path / "a.tar.gz", members, "w:gz")
    storage.write_bytes(f"s3://{bucket}/a.tar.gz", archive.read_bytes())
    result = ingest_images([f"s3://{bucket}/a.tar.gz"], str(tmp_path / "out"), one_worker)
    assert result.images == 6


def test_image_without_a_concept_folder_is_a_layout_error_naming_it(tmp_path, one_worker):
    root = write_tree(
        tmp_path / "src", {"cat/concept/a.jpg": jpeg_bytes(), "cat/loose.jpg": jpeg_bytes()}
    )
    with pytest.raises(LayoutError, match=r"cat/loose\.jpg: image is not in the expected"):
        ingest_images([str(root)], str(tmp_path / "out"), one_worker)


def test_empty_or_missing_sources_are_clear_errors(tmp_path, one_worker):
    (tmp_path / "empty" / "cat").mkdir(parents=True)
    (tmp_path / "empty" / "cat" / "notes.txt").write_text("no images here")
    with pytest.raises(LayoutError, match=r"empty: no images found"):
        ingest_images([str(tmp_path / "empty")], str(tmp_path / "out"), one_worker)
    with pytest.raises(LayoutError, match=r"missing: source does not exist"):
        ingest_images([str(tmp_path / "missing")], str(tmp_path / "out"), one_worker)
    with pytest.raises(LayoutError, match="no sources"):
        ingest_images([], str(tmp_path / "out"), one_worker)


def test_failed_run_loses_nothing_already_written(demo_dir, tmp_path, one_worker):
    out = str(tmp_path / "out")
    ingest_images([str(demo_dir)], out, one_worker)
    before = rows(out)
    bad = write_tree(tmp_path / "bad", {"a/b/ok.jpg": jpeg_bytes(), "flat.jpg": jpeg_bytes()})
    with pytest.raises(LayoutError):
        ingest_images([str(bad)], out, one_worker)
    assert rows(out) == before


def test_reading_an_unfinished_dataset_says_so(tmp_path):
    (tmp_path / "half").mkdir()
    with pytest.raises(datasets.DatasetError, match="not a complete embedpipe dataset"):
        datasets.read_table(str(tmp_path / "half"))
