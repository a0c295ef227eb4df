"""Outputs are written by one run at a time, never over their inputs, and leave nothing
behind; inputs are checked whole before a stage starts; S3 failures are one line."""

import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pyarrow as pa
import pytest
from conftest import flat_tree, jpeg_bytes, lock_held_elsewhere, write_tree

from embedpipe.cli import main
from embedpipe.config import (
    CatalogSettings,
    CombineSettings,
    DedupSettings,
    EmbedSettings,
    MineSettings,
    SplitSettings,
    TaxonomySettings,
    ToHfSettings,
)
from embedpipe.core import datasets, locks, outputs, storage
from embedpipe.core.schemas import (
    CATALOG_KIND,
    EMBEDDINGS_KIND,
    IMAGES_KIND,
    NEGATIVES_KIND,
    PARTITION_KIND,
)


def embedpipe(*args: str, env: dict | None = None) -> subprocess.Popen:
    return subprocess.Popen(
        [sys.executable, "-m", "embedpipe", "--log-level", "ERROR", *args],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env={**os.environ, **(env or {})},
    )


def shard_files(folder: Path) -> set[str]:
    return {p.name for p in folder.glob("part-*.parquet")}


def leftovers(folder: Path) -> list[str]:
    """Temporary files, staging folders and locks anywhere under ``folder``."""
    return sorted(
        str(p.relative_to(folder))
        for p in folder.rglob("*")
        if p.name.endswith(".tmp") or p.name in ("staging", "lock") or "staging" in p.parts
    )


@pytest.fixture(scope="module")
def many_images(tmp_path_factory) -> Path:
    """800 distinct images: enough for ingest to run a few seconds in 80+ shards."""
    return flat_tree(tmp_path_factory.mktemp("many") / "src", categories=4, concepts=10, images=20)


# -- 4: concurrent writers ------------------------------------------------------------------


def test_two_concurrent_ingest_runs_leave_a_manifest_whose_shards_all_exist(many_images, tmp_path):
    out = tmp_path / "images"
    runs = [
        embedpipe("ingest", str(many_images), "--out", str(out), "--rows-per-shard", str(rows))
        for rows in (7, 9)  # different shards, so each run's cleanup would hit the other's
    ]
    outcomes = [(run.wait(), run.stderr.read()) for run in runs]
    assert any(code == 0 for code, _ in outcomes)
    for code, stderr in outcomes:
        if code != 0:
            assert "another embedpipe run is writing this output" in stderr
            assert str(out / ".embedpipe" / "lock") in stderr
            assert "Traceback" not in stderr
    manifest = datasets.verify_dataset(str(out), IMAGES_KIND)
    assert {s["path"] for s in manifest["shards"]} == shard_files(out)
    assert datasets.read_table(str(out)).num_rows == 800
    assert leftovers(out) == []


def test_a_live_lock_refuses_a_second_run_naming_the_lock_and_how_to_clear_it(tmp_path, capsys):
    source = flat_tree(tmp_path / "src", categories=1, concepts=2, images=2)
    out = tmp_path / "images"
    with lock_held_elsewhere(out) as (pid, lock_path):
        assert main(["ingest", str(source), "--out", str(out), "--workers", "1"]) == 1
        error = capsys.readouterr().err.strip()
        assert "\n" not in error
        assert f"pid {pid}" in error
        assert f"delete {lock_path} and run again" in error
        assert lock_path.exists() and not (out / ".embedpipe" / "manifest.json").exists()
    # Its process is gone now: the lock is stale and the next run takes it over.
    assert main(["ingest", str(source), "--out", str(out), "--workers", "1"]) == 0
    assert not lock_path.exists()


def test_a_lock_from_another_host_is_taken_over_once_its_lease_ran_out(tmp_path, monkeypatch):
    out = tmp_path / "out"
    lock_path = out / ".embedpipe" / "lock"
    lock_path.parent.mkdir(parents=True)
    lock_path.write_text(json.dumps({"pid": 1, "host": "another-host", "started": "earlier"}))
    table = pa.table({"x": [1, 2, 3]})
    with pytest.raises(locks.OutputLockedError, match="another-host"):
        datasets.write_table(str(out), table, "numbers")
    an_hour_ago = time.time() - 3600
    os.utime(lock_path, (an_hour_ago, an_hour_ago))
    datasets.write_table(str(out), table, "numbers")
    assert datasets.read_table(str(out)).num_rows == 3
    assert not lock_path.exists()


def test_kill_9_mid_run_leaves_a_lock_and_staging_that_the_next_run_clears(many_images, tmp_path):
    out = tmp_path / "images"
    run = embedpipe("ingest", str(many_images), "--out", str(out), "--rows-per-shard", "5")
    staging = out / ".embedpipe" / "staging"
    while run.poll() is None and not any(staging.rglob("*.tmp")):
        time.sleep(0.005)
    assert run.poll() is None, "ingest finished before it could be killed"
    run.send_signal(signal.SIGKILL)
    run.wait()
    assert (out / ".embedpipe" / "lock").exists() and any(staging.rglob("*"))
    assert not (out / ".embedpipe" / "manifest.json").exists()

    rerun = embedpipe("ingest", str(many_images), "--out", str(out), "--rows-per-shard", "50")
    assert rerun.wait() == 0, rerun.stderr.read()
    manifest = datasets.verify_dataset(str(out), IMAGES_KIND)
    assert {s["path"] for s in manifest["shards"]} == shard_files(out)
    assert leftovers(out) == []


def test_sigterm_unwinds_releasing_the_lock_and_removing_temporary_files(many_images, tmp_path):
    out = tmp_path / "images"
    run = embedpipe("ingest", str(many_images), "--out", str(out), "--rows-per-shard", "5")
    staging = out / ".embedpipe" / "staging"
    while run.poll() is None and not any(staging.rglob("*.tmp")):
        time.sleep(0.005)
    assert run.poll() is None, "ingest finished before it could be stopped"
    run.send_signal(signal.SIGTERM)
    assert run.wait() == 128 + signal.SIGTERM
    stderr = run.stderr.read()
    assert "terminated" in stderr and "Traceback" not in stderr
    assert leftovers(out) == []
    assert not (out / ".embedpipe" / "manifest.json").exists()


def test_a_rerun_removes_hidden_temporary_files_an_older_run_left_in_the_output(tmp_path):
    out = tmp_path / "out"
    datasets.write_table(str(out), pa.table({"x": [1]}), "numbers")
    old = [out / ".part-00000-0123456789abcdef.parquet.a1b2.tmp", out / ".embedpipe" / ".x.tmp"]
    for path in old:
        path.write_bytes(b"half")
    datasets.write_table(str(out), pa.table({"x": [1, 2]}), "numbers")
    assert not any(path.exists() for path in old)
    assert leftovers(out) == []


def test_staging_of_an_s3_output_is_local_and_cleared_by_the_next_run(
    bucket, tmp_path, monkeypatch
):
    monkeypatch.setattr("tempfile.tempdir", str(tmp_path))
    out = f"s3://{bucket}/numbers"
    staging = Path(outputs.staging_folder(out))
    assert staging.parent == tmp_path
    staging.mkdir()
    (staging / "killed-run.tmp").write_bytes(b"half")
    datasets.write_table(out, pa.table({"x": [1, 2]}), "numbers")
    assert not staging.exists()
    assert datasets.read_table(out).num_rows == 2


def test_s3_lock_is_created_only_if_absent_and_a_stale_one_is_taken_over(bucket, monkeypatch):
    out = f"s3://{bucket}/out"
    lock_uri = outputs.side_path(out, outputs.LOCK_NAME)
    first = locks.OutputLock(out, lock_uri)
    first.record["pid"] = 999_999_999  # as if another run: not this process
    first.record["host"] = "another-host"
    first.acquire()
    second = locks.OutputLock(out, lock_uri)
    with pytest.raises(locks.OutputLockedError, match="another-host"):
        second.acquire()
    monkeypatch.setattr(locks, "LEASE_SECONDS", -1.0)  # every lock is past its lease
    second.acquire()
    with pytest.raises(locks.OutputLockedError, match="lost its lock"):
        first.verify_held()
    first.release()  # must not remove the lock it lost
    assert storage.exists(lock_uri)
    second.verify_held()
    second.release()
    assert not storage.exists(lock_uri)


def test_two_concurrent_ingest_runs_to_s3_leave_a_consistent_dataset(many_images, bucket):
    out = f"s3://{bucket}/images"
    runs = [
        embedpipe("ingest", str(many_images), "--out", out, "--rows-per-shard", str(rows))
        for rows in (7, 9)
    ]
    outcomes = [(run.wait(), run.stderr.read()) for run in runs]
    assert any(code == 0 for code, _ in outcomes)
    for code, stderr in outcomes:
        if code != 0:
            assert "another embedpipe run is writing this output" in stderr
    manifest = datasets.verify_dataset(out, IMAGES_KIND)
    assert datasets.read_table(out).num_rows == 800
    assert {s["path"] for s in manifest["shards"]} == {
        name for name in storage.list_names(out) if name.endswith(".parquet")
    }
    assert not storage.exists(outputs.side_path(out, outputs.LOCK_NAME))


# -- 5: outputs apart from inputs -----------------------------------------------------------


@pytest.fixture
def images_copy(demo_images, tmp_path) -> Path:
    copy = tmp_path / "images"
    shutil.copytree(demo_images, copy)
    return copy


def snapshot(folder: Path) -> dict[str, bytes]:
    return {str(p.relative_to(folder)): p.read_bytes() for p in folder.rglob("*") if p.is_file()}


@pytest.mark.parametrize(
    "out, problem",
    [
        ("{images}", "is also an input"),
        ("{images}/", "is also an input"),
        ("{images}/sub/../", "is also an input"),
        ("{images}/catalog", "lies inside the input"),
        ("{tmp}", "contains the input"),
    ],
)
def test_an_output_overlapping_its_input_is_refused_and_the_input_kept(
    images_copy, tmp_path, capsys, out, problem
):
    before = snapshot(images_copy)
    out = out.format(images=images_copy, tmp=tmp_path)
    assert main(["catalog", str(images_copy), "--out", out]) == 1
    error = capsys.readouterr().err.strip()
    assert problem in error and "\n" not in error
    assert snapshot(images_copy) == before


def test_ingest_refuses_an_output_inside_a_source_folder(tmp_path, capsys):
    source = flat_tree(tmp_path / "src", categories=1, concepts=2, images=2)
    before = snapshot(source)
    assert main(["ingest", str(source), "--out", str(source / "images"), "--workers", "1"]) == 1
    assert "lies inside the input" in capsys.readouterr().err
    assert snapshot(source) == before  # not even an empty folder was made


def test_a_symlink_to_the_input_is_the_input(images_copy, tmp_path, capsys):
    link = tmp_path / "link"
    link.symlink_to(images_copy)
    assert main(["catalog", str(images_copy), "--out", str(link)]) == 1
    assert "is also an input" in capsys.readouterr().err


def test_dedup_refuses_a_kept_selection_that_is_an_input(demo_images, tmp_path):
    with pytest.raises(storage.StorageError, match="is also an input"):
        from embedpipe.data.dedup import find_duplicates

        find_duplicates(demo_images, str(tmp_path / "d"), DedupSettings(), kept_uri=demo_images)


# -- 7: one-line errors ---------------------------------------------------------------------


def test_out_under_a_file_or_equal_to_a_file_is_one_line(tmp_path, capsys):
    source = flat_tree(tmp_path / "src", categories=1, concepts=2, images=2)
    afile = tmp_path / "afile"
    afile.write_text("x")
    for out in (afile, afile / "images"):
        assert main(["ingest", str(source), "--out", str(out), "--workers", "1"]) == 1
        error = capsys.readouterr().err.strip()
        assert "is a file" in error and "\n" not in error
    assert afile.read_text() == "x"


def test_missing_bucket_is_one_line(s3_endpoint, tmp_path, capsys):
    source = flat_tree(tmp_path / "src", categories=1, concepts=2, images=2)
    assert main(["ingest", str(source), "--out", "s3://no-such-bucket/x", "--workers", "1"]) == 1
    error = capsys.readouterr().err.strip()
    assert error.endswith("s3://no-such-bucket/x: cannot take the lock: bucket does not exist")


@pytest.fixture
def fresh_s3_clients():
    storage._s3_client.cache_clear()
    storage._s3_filesystem.cache_clear()
    yield
    storage._s3_client.cache_clear()
    storage._s3_filesystem.cache_clear()


def test_missing_credentials_are_one_line(tmp_path, capsys, monkeypatch, fresh_s3_clients):
    for name in ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_SESSION_TOKEN", "AWS_PROFILE"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("AWS_SHARED_CREDENTIALS_FILE", str(tmp_path / "none"))
    monkeypatch.setenv("AWS_CONFIG_FILE", str(tmp_path / "none"))
    monkeypatch.setenv("AWS_EC2_METADATA_DISABLED", "true")
    source = flat_tree(tmp_path / "src", categories=1, concepts=2, images=2)
    assert main(["ingest", str(source), "--out", "s3://bucket/x", "--workers", "1"]) == 1
    error = capsys.readouterr().err.strip()
    assert error.endswith(
        "s3://bucket/x: cannot take the lock: no credentials "
        "(set AWS_ACCESS_KEY_ID/AWS_SECRET_ACCESS_KEY)"
    )


def test_an_endpoint_that_is_gone_is_one_line(tmp_path, capsys, monkeypatch, fresh_s3_clients):
    with socket.socket() as probe:  # a port nothing listens on
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    monkeypatch.setenv("AWS_ENDPOINT_URL_S3", f"http://127.0.0.1:{port}")
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", "testing")
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "testing")
    monkeypatch.setattr(storage, "MAX_ATTEMPTS", 2)
    source = flat_tree(tmp_path / "src", categories=1, concepts=2, images=2)
    assert main(["ingest", str(source), "--out", "s3://bucket/x", "--workers", "1"]) == 1
    error = capsys.readouterr().err.strip()
    assert error.endswith(
        f"s3://bucket/x: cannot take the lock: cannot reach the endpoint "
        f"http://127.0.0.1:{port} (connection refused)"
    )
    assert main(["catalog", "s3://bucket/images", "--out", str(tmp_path / "c")]) == 1
    error = capsys.readouterr().err.strip()
    assert "\n" not in error and "(connection refused)" in error


def test_a_manifest_that_is_not_an_object_names_the_file(tmp_path):
    folder = tmp_path / "d"
    (folder / ".embedpipe").mkdir(parents=True)
    (folder / ".embedpipe" / "manifest.json").write_text("[]")
    with pytest.raises(datasets.DatasetError, match=r"manifest.json: not an embedpipe manifest"):
        datasets.read_table(str(folder))


# -- 9: readers stay inside the dataset -----------------------------------------------------


@pytest.mark.parametrize(
    "path", ["../../../../etc/hostname", "/etc/hostname", "sub/part-0.parquet", "part-0.parquet/.."]
)
def test_a_shard_path_outside_the_dataset_is_refused(tmp_path, path):
    folder = tmp_path / "d"
    datasets.write_table(str(folder), pa.table({"x": [1]}), "numbers")
    manifest = json.loads((folder / ".embedpipe" / "manifest.json").read_text())
    manifest["shards"][0]["path"] = path
    (folder / ".embedpipe" / "manifest.json").write_text(json.dumps(manifest))
    with pytest.raises(datasets.DatasetError, match="refusing to read it"):
        datasets.read_table(str(folder))


@pytest.mark.parametrize("part", ["../elsewhere", "/etc", "a/../../b"])
def test_a_bundle_part_outside_the_bundle_is_refused(tmp_path, part):
    folder = tmp_path / "bundle"
    datasets.finish_bundle(str(folder), "bundle", ["ok"], {})
    manifest = json.loads((folder / ".embedpipe" / "manifest.json").read_text())
    manifest["parts"] = [part]
    (folder / ".embedpipe" / "manifest.json").write_text(json.dumps(manifest))
    with pytest.raises(datasets.DatasetError, match="not a folder inside the bundle"):
        datasets.read_manifest(str(folder))


# -- 8: inputs are verified before a stage starts -------------------------------------------


def dataset_missing_a_shard(folder: Path, kind: str, **extra) -> tuple[str, str]:
    """A dataset of ``kind`` written in two shards, one of them then deleted by hand."""
    datasets.write_table(
        str(folder), pa.table({"x": [1, 2]}), kind, extra=extra or None, rows_per_shard=1
    )
    shard = sorted(shard_files(folder))[1]
    (folder / shard).unlink()
    return str(folder), shard


def run_stage(stage: str, broken: str, tmp_path: Path, tiny_entry) -> None:
    out = str(tmp_path / "out")
    from embedpipe.data.catalog import build_catalog
    from embedpipe.data.dedup import find_duplicates
    from embedpipe.data.split import create_concept_splits
    from embedpipe.embed.images import embed_images
    from embedpipe.mining.combine import combine_negatives
    from embedpipe.mining.mine import mine_category
    from embedpipe.mining.partition import partition_by_category
    from embedpipe.mining.to_hf import export_to_hf
    from embedpipe.taxonomy.stage import build_taxonomy

    calls = {
        "catalog": lambda: build_catalog(broken, out, CatalogSettings()),
        "split": lambda: create_concept_splits(broken, out, SplitSettings()),
        "dedup": lambda: find_duplicates(broken, out, DedupSettings(workers=1)),
        "embed": lambda: embed_images(broken, out, EmbedSettings(weights="random"), tiny_entry),
        "partition": lambda: partition_by_category(broken, broken, out),
        "mine": lambda: mine_category(broken, out, MineSettings()),
        "combine": lambda: combine_negatives([broken], out, CombineSettings()),
        "to_hf": lambda: export_to_hf(broken, broken, out, ToHfSettings()),
        "taxonomy": lambda: build_taxonomy(broken, "unused.tsv", out, TaxonomySettings()),
    }
    calls[stage]()


@pytest.mark.parametrize(
    "stage, kind, extra",
    [
        ("catalog", IMAGES_KIND, {}),
        ("split", CATALOG_KIND, {}),
        ("dedup", IMAGES_KIND, {}),
        ("embed", IMAGES_KIND, {}),
        ("partition", EMBEDDINGS_KIND, {}),
        ("mine", PARTITION_KIND, {"category": "c"}),
        ("combine", NEGATIVES_KIND, {}),
        ("to_hf", NEGATIVES_KIND, {}),
        ("taxonomy", IMAGES_KIND, {}),
    ],
)
def test_a_stage_stops_at_once_when_an_input_shard_is_missing(
    stage, kind, extra, tmp_path, tiny_entry
):
    broken, shard = dataset_missing_a_shard(tmp_path / "input", kind, **extra)
    with pytest.raises(datasets.DatasetError) as error:
        run_stage(stage, broken, tmp_path, tiny_entry)
    assert str(error.value).startswith(f"{broken}: shard {shard} listed in")
    assert "is missing" in str(error.value)


def test_the_cli_prints_a_missing_input_shard_as_one_line(images_copy, tmp_path, capsys):
    shard = sorted(shard_files(images_copy))[0]
    (images_copy / shard).unlink()
    assert main(["catalog", str(images_copy), "--out", str(tmp_path / "c")]) == 1
    error = capsys.readouterr().err.strip()
    assert f"shard {shard} listed in .embedpipe/manifest.json is missing" in error
    assert "\n" not in error


# -- 10: embed leaves no empty progress folder ----------------------------------------------


def test_a_finished_embed_leaves_no_progress_folder_and_no_staging(
    tmp_path, tiny_entry, one_worker
):
    from embedpipe.data.ingest import ingest_images
    from embedpipe.embed.images import embed_images

    source = write_tree(
        tmp_path / "src", {"c/k/a.jpg": jpeg_bytes(), "c/k/b.jpg": jpeg_bytes((1, 2, 3))}
    )
    ingest_images([str(source)], str(tmp_path / "images"), one_worker)
    out = tmp_path / "emb"
    embed_images(
        str(tmp_path / "images"),
        str(out),
        EmbedSettings(weights="random", num_workers=0),
        tiny_entry,
    )
    assert sorted(p.name for p in (out / ".embedpipe").iterdir()) == [
        "config.json",
        "manifest.json",
        "rejected.parquet",  # the images embed could not decode (none here)
    ]


def test_only_the_writing_process_of_a_distributed_run_takes_the_lock(tmp_path, monkeypatch):
    from embedpipe.train.distributed import is_main_process

    @outputs.writes_output(writer=is_main_process)
    def stage(out_uri: str) -> str:
        return "ran"

    out = tmp_path / "model"
    with lock_held_elsewhere(out) as (pid, lock_path):
        record = lock_path.read_text()
        monkeypatch.setenv("WORLD_SIZE", "2")
        monkeypatch.setenv("RANK", "1")  # reads only: runs beside the writer
        assert stage(str(out)) == "ran"
        monkeypatch.setenv("RANK", "0")  # writes: needs the lock
        with pytest.raises(locks.OutputLockedError, match=f"pid {pid}"):
            stage(str(out))
        assert lock_path.read_text() == record
