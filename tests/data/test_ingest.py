import hashlib
import io
import tarfile
from pathlib import Path

import pyarrow.parquet as pq
import pytest
from conftest import (
    flat_tree,
    jpeg_bytes,
    jpeg_with_orientation,
    png_bytes,
    png_claiming,
    sixteen_bit_png,
    strip_png,
    upload_tree,
    write_tree,
)

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


def test_images_over_the_pixel_and_aspect_caps_are_rejected_with_the_reason(tmp_path, one_worker):
    root = write_tree(
        tmp_path / "src",
        {
            "cat/concept/ok.jpg": jpeg_bytes(size=(40, 30)),
            "cat/concept/small.png": png_bytes(size=(20, 20)),
            "cat/concept/strip.png": strip_png(),  # 16000x1
            "cat/concept/bomb.png": png_claiming(20_000, 5_000),  # 100M pixels declared
        },
    )
    result = ingest_images([str(root)], str(tmp_path / "out"), one_worker)
    assert (result.images, result.rejected) == (2, 2)
    reasons = {Path(r["source"]).name: r["reason"] for r in rejected(tmp_path / "out")}
    assert reasons["strip.png"].startswith("extreme aspect ratio: 16000x1 is over")
    assert reasons["bomb.png"].startswith("too many pixels: 20000x5000 is over max_pixels")
    tight = IngestSettings(workers=1, max_pixels=1000)
    result = ingest_images([str(root)], str(tmp_path / "tight"), tight)
    assert (result.images, result.rejected) == (1, 3)
    reasons = {Path(r["source"]).name: r["reason"] for r in rejected(tmp_path / "tight")}
    assert reasons["ok.jpg"] == "too many pixels: 40x30 is over max_pixels=1000"


def test_oversized_tar_member_is_rejected_from_its_header_unread(tmp_path, monkeypatch):
    small = jpeg_bytes()
    members = {"cat/concept/big.jpg": bytes(8 << 20), "cat/concept/small.jpg": small}
    archive = make_tar(tmp_path / "a.tar.gz", members, "w:gz")
    extracted = []
    real_extract = tarfile.TarFile.extractfile

    def spy(self, member):
        extracted.append(member.name)
        return real_extract(self, member)

    monkeypatch.setattr(tarfile.TarFile, "extractfile", spy)
    config = IngestSettings(workers=1, max_image_bytes=1 << 20)
    result = ingest_images([str(archive)], str(tmp_path / "out"), config)
    assert result.images == 1 and extracted == ["cat/concept/small.jpg"]
    (row,) = rejected(tmp_path / "out")
    assert row["source"] == f"{archive}::cat/concept/big.jpg"
    assert row["reason"] == f"file is {8 << 20} bytes, over max_image_bytes={1 << 20}"


def test_oversized_folder_file_is_rejected_unread(tmp_path, monkeypatch):
    root = write_tree(
        tmp_path / "src",
        {"cat/concept/big.png": png_bytes(size=(300, 300)), "cat/concept/ok.jpg": jpeg_bytes()},
    )
    read = []
    real_read = storage.read_bytes
    monkeypatch.setattr(storage, "read_bytes", lambda uri: read.append(uri) or real_read(uri))
    limit = (root / "cat/concept/big.png").stat().st_size - 1
    config = IngestSettings(workers=1, max_image_bytes=limit)
    result = ingest_images([str(root)], str(tmp_path / "out"), config)
    assert result.images == 1 and read == [str(root / "cat/concept/ok.jpg")]
    assert rejected(tmp_path / "out")[0]["reason"].endswith(f"over max_image_bytes={limit}")


PEAK_RSS_SCRIPT = """
import resource, sys
from embedpipe.config import IngestSettings
from embedpipe.data.ingest import ingest_images
config = IngestSettings(workers=1, max_image_bytes=32 << 20)
for archive in sys.argv[1:]:
    result = ingest_images([archive], archive + ".out", config)
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    print(result.images, result.rejected, peak)
"""


def test_a_huge_member_never_enters_memory(tmp_path):
    """A 128 MiB member (under 1 MiB of gzip) over max_image_bytes is skipped by streaming
    past it: ingesting its archive leaves the peak memory where a small archive put it."""
    import subprocess
    import sys

    small = make_tar(tmp_path / "small.tar.gz", {"cat/c/ok.jpg": jpeg_bytes()}, "w:gz")
    huge = tmp_path / "huge.tar.gz"
    with tarfile.open(huge, "w:gz", compresslevel=1) as tar:
        info = tarfile.TarInfo("cat/c/huge.jpg")
        info.size = 128 << 20
        tar.addfile(info, io.BufferedReader(ZeroReader(info.size)))
        ok = jpeg_bytes()
        info = tarfile.TarInfo("cat/c/ok.jpg")
        info.size = len(ok)
        tar.addfile(info, io.BytesIO(ok))
    assert huge.stat().st_size < 2 << 20
    lines = subprocess.run(
        [sys.executable, "-c", PEAK_RSS_SCRIPT, str(small), str(huge)],
        capture_output=True,
        text=True,
        check=True,
    ).stdout.splitlines()
    (images, rejects, baseline), (huge_images, huge_rejects, peak) = (
        map(int, line.split()) for line in lines
    )
    assert (images, rejects, huge_images, huge_rejects) == (1, 0, 1, 1)
    assert peak - baseline < 32 << 10  # KiB: far below the member's 128 MiB


class ZeroReader(io.RawIOBase):
    def __init__(self, size: int) -> None:
        self.left = size

    def readable(self) -> bool:
        return True

    def readinto(self, buffer) -> int:
        count = min(len(buffer), self.left)
        buffer[:count] = bytes(count)
        self.left -= count
        return count


def test_tar_gz_that_is_not_gzip_is_a_one_line_error_naming_it(tmp_path, one_worker):

    not_gzip = tmp_path / "images.tar.gz"
    not_gzip.write_bytes(b"this is a text file, not a gzip stream\n" * 50)
    with pytest.raises(LayoutError, match=r"images\.tar\.gz: not a readable tar archive"):
        ingest_images([str(not_gzip)], str(tmp_path / "out"), one_worker)
    bad_stream = tmp_path / "bad.tar.gz"
    bad_stream.write_bytes(b"\x1f\x8b\x08\x00" + bytes(range(256)) * 20)  # gzip magic, garbage
    with pytest.raises(LayoutError, match=r"bad\.tar\.gz: not a readable tar archive"):
        ingest_images([str(bad_stream)], str(tmp_path / "out"), one_worker)


def test_cli_reports_a_broken_tar_gz_in_one_line(tmp_path, capsys):
    from embedpipe.cli import main

    not_gzip = tmp_path / "images.tar.gz"
    not_gzip.write_bytes(b"plain text\n" * 100)
    assert main(["ingest", str(not_gzip), "--out", str(tmp_path / "out")]) == 1
    err = capsys.readouterr().err.strip()
    assert "\n" not in err and "images.tar.gz: not a readable tar archive" in err


def test_duplicate_tar_member_names_keep_the_first_and_report_the_rest(tmp_path, one_worker):
    first, second = jpeg_bytes((200, 0, 0)), jpeg_bytes((0, 0, 200))
    archive = tmp_path / "dup.tar"
    with tarfile.open(archive, "w") as tar:
        for name, data in (
            ("cat/c/a.jpg", first),
            ("cat/c/b.jpg", first),
            ("./cat/c/a.jpg", second),
        ):
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    result = ingest_images([str(archive)], str(tmp_path / "out"), one_worker)
    table = rows(result.out_uri, ["source", "image"])
    assert [(Path(r["source"]).name, r["image"]) for r in table] == [
        ("a.jpg", first),
        ("b.jpg", first),
    ]
    (row,) = rejected(tmp_path / "out")
    assert row["source"] == f"{archive}::./cat/c/a.jpg"
    assert row["reason"].startswith("duplicate member name")


def test_symlinks_leaving_the_folder_are_rejected_not_followed(tmp_path, one_worker):
    outside = write_tree(tmp_path / "outside", {"secret.jpg": jpeg_bytes((1, 2, 3))})
    root = write_tree(tmp_path / "src", {"cat/concept/ok.jpg": jpeg_bytes()})
    (root / "cat/concept/leak.jpg").symlink_to(outside / "secret.jpg")
    (root / "cat/elsewhere").symlink_to(outside, target_is_directory=True)
    (root / "cat/concept/alias.jpg").symlink_to(root / "cat/concept/ok.jpg")  # stays inside
    (root / "cat/loop").symlink_to(root / "cat", target_is_directory=True)
    result = ingest_images([str(root)], str(tmp_path / "out"), one_worker)
    names = sorted(Path(r["source"]).name for r in rows(result.out_uri, ["source"]))
    assert names == ["alias.jpg", "ok.jpg"]
    reasons = {r["source"]: r["reason"] for r in rejected(tmp_path / "out")}
    assert reasons == {
        str(
            root / "cat/concept/leak.jpg"
        ): "symlink leads outside the source folder (not followed)",
        str(root / "cat/elsewhere"): "symlink leads outside the source folder (not followed)",
        str(root / "cat/loop"): "symlink loop (not followed)",
    }


def test_rejected_rows_are_identical_between_runs(tmp_path, one_worker):
    root = write_tree(
        tmp_path / "src",
        {
            "cat/c/ok.jpg": jpeg_bytes(),
            "cat/c/junk.jpg": b"not an image",
            "cat/c/cut.png": png_bytes()[:40],
        },
    )
    ingest_images([str(root)], str(tmp_path / "a"), one_worker)
    ingest_images([str(root)], str(tmp_path / "b"), one_worker)
    first, second = rejected(tmp_path / "a"), rejected(tmp_path / "b")
    assert first == second and len(first) == 2
    assert not any(" at 0x" in r["reason"] for r in first)
    a = (tmp_path / "a" / ".embedpipe" / REJECTED_NAME).read_bytes()
    assert a == (tmp_path / "b" / ".embedpipe" / REJECTED_NAME).read_bytes()


def test_width_and_height_are_the_displayed_ones(tmp_path, one_worker):
    import numpy as np

    root = write_tree(
        tmp_path / "src",
        {
            "cat/c/turned.jpg": jpeg_with_orientation(6),  # stored 40x20
            "cat/c/deep.png": sixteen_bit_png(np.full((10, 30), 40000)),
        },
    )
    result = ingest_images([str(root)], str(tmp_path / "out"), one_worker)
    sizes = {
        Path(r["source"]).name: (r["width"], r["height"])
        for r in rows(result.out_uri, ["source", "width", "height"])
    }
    assert sizes == {"turned.jpg": (20, 40), "deep.png": (30, 10)}
