"""ImageNet validation and COCO captions sources, built in their exact published layouts."""

import csv
import io
import json
import tarfile
import zipfile
from pathlib import Path

import pyarrow.parquet as pq
import pytest
from conftest import jpeg_bytes, write_tree

from embedpipe.cli import main
from embedpipe.config import (
    CatalogSettings,
    DedupSettings,
    EmbedSettings,
    IngestSettings,
    SplitSettings,
)
from embedpipe.core import datasets, storage
from embedpipe.core.schemas import IMAGES_SCHEMA
from embedpipe.data.catalog import build_catalog
from embedpipe.data.dedup import find_duplicates
from embedpipe.data.ingest import REJECTED_NAME, REPORT_NAME, ingest_images
from embedpipe.data.sources import LayoutError
from embedpipe.data.split import create_concept_splits
from embedpipe.embed.images import embed_images

SYNSETS = {
    "n01440764": "tench, Tinca tinca",
    "n01443537": "goldfish, Carassius auratus",
    "n01484850": "great white shark, white shark, man-eater, man-eating shark",
    "n01491361": "tiger shark, Galeocerdo cuvieri",  # a class with no image here
}
LABELS = {
    "n01440764": "tench",
    "n01443537": "goldfish",
    "n01484850": "great white shark",
    "n01491361": "tiger shark",
}
# File N of the validation set shows class GROUND_TRUTH[N - 1] (as in the real set, unsorted).
GROUND_TRUTH = ["n01484850", "n01440764", "n01443537", "n01440764", "n01484850", "n01443537"]


def val_name(number: int) -> str:
    return f"ILSVRC2012_val_{number:08d}.JPEG"


def val_images() -> dict[str, bytes]:
    return {
        val_name(n): jpeg_bytes((40 * n, 255 - 30 * n, 7 * n), (30 + n, 20 + n))
        for n in range(1, len(GROUND_TRUTH) + 1)
    }


def make_tar(path: Path, members: list[tuple[str, bytes]]) -> Path:
    with tarfile.open(path, "w") as tar:
        for name, data in members:
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    return path


def seed_meta(root: Path, ground_truth=GROUND_TRUTH, labels=LABELS) -> Path:
    """The files the seed scripts write: one wnid per line, and a wnid -> name map."""
    root.mkdir(parents=True, exist_ok=True)
    (root / "ILSVRC2012_val_synsets.txt").write_text("\n".join(ground_truth) + "\n")
    (root / "wnid_to_label.json").write_text(json.dumps(labels))
    return root


def kaggle_meta(root: Path, ground_truth=GROUND_TRUTH, synsets=SYNSETS) -> Path:
    """Kaggle's ImageNet localization files: a solution CSV (rows in no particular
    order, boxes after the wnid) and the synset mapping."""
    root.mkdir(parents=True, exist_ok=True)
    buffer = io.StringIO()
    writer = csv.writer(buffer, lineterminator="\n")
    writer.writerow(["ImageId", "PredictionString"])
    for number in sorted(range(1, len(ground_truth) + 1), key=lambda n: (n * 7) % 5):
        wnid = ground_truth[number - 1]
        writer.writerow([f"ILSVRC2012_val_{number:08d}", f"{wnid} 10 20 30 40 {wnid} 1 2 3 4 "])
    (root / "LOC_val_solution.csv").write_text(buffer.getvalue())
    mapping = "".join(f"{wnid} {names}\n" for wnid, names in synsets.items())
    (root / "LOC_synset_mapping.txt").write_text(mapping)
    return root


def val_tar(tmp_path: Path, members=None) -> Path:
    return make_tar(tmp_path / "ILSVRC2012_img_val.tar", members or list(val_images().items()))


def ingest(sources, out, **settings):
    config = IngestSettings(workers=1, **settings)
    return ingest_images([str(source) for source in sources], str(out), config)


def image_rows(out, columns):
    return datasets.read_table(str(out), "images", columns=columns).to_pylist()


def rejected(out):
    return pq.read_table(datasets.side_path(str(out), REJECTED_NAME)).to_pylist()


def test_imagenet_val_tar_rows_labels_and_label_files(tmp_path):
    archive = val_tar(tmp_path)
    meta = seed_meta(tmp_path / "meta")
    result = ingest([archive], tmp_path / "out", imagenet_meta=str(meta))
    assert (result.images, result.rejected) == (6, 0)
    table = datasets.read_table(str(tmp_path / "out"), "images")
    assert table.column_names == [*IMAGES_SCHEMA.names, "label"]
    rows = table.to_pylist()
    assert [row["source"] for row in rows] == [f"{archive}::{val_name(n)}" for n in range(1, 7)]
    for number, row in enumerate(rows, 1):
        wnid = GROUND_TRUTH[number - 1]
        assert (row["category"], row["concept"], row["split"]) == ("imagenet", wnid, None)
        assert row["label"] == LABELS[wnid]
        assert row["image"] == val_images()[val_name(number)]
        assert (row["width"], row["height"]) == (30 + number, 20 + number)
    side = datasets.side_path(str(tmp_path / "out"))
    assert storage.read_json(f"{side}/wnid_to_label.json") == LABELS
    class_index = storage.read_json(f"{side}/imagenet_class_index.json")
    assert class_index == {
        "0": ["n01440764", "tench"],
        "1": ["n01443537", "goldfish"],
        "2": ["n01484850", "great white shark"],
        "3": ["n01491361", "tiger shark"],
    }
    manifest = datasets.read_manifest(str(tmp_path / "out"), "images")
    assert manifest["source_kinds"] == ["imagenet"]


def test_imagenet_folder_with_kaggle_meta_gives_the_same_rows_as_the_tar(tmp_path):
    columns = ["image_id", "category", "concept", "label", "width", "height"]
    ingest([val_tar(tmp_path)], tmp_path / "from_tar", imagenet_meta=str(seed_meta(tmp_path / "m")))
    folder = write_tree(tmp_path / "val", val_images())
    ingest([folder], tmp_path / "from_folder", imagenet_meta=str(kaggle_meta(tmp_path / "k")))
    from_folder = image_rows(tmp_path / "from_folder", columns)
    assert from_folder == image_rows(tmp_path / "from_tar", columns)
    side = datasets.side_path(str(tmp_path / "from_folder"))
    # LOC_synset_mapping.txt's names are cut at the first comma, like the seed map's.
    assert storage.read_json(f"{side}/wnid_to_label.json") == LABELS
    assert storage.read_json(f"{side}/imagenet_class_index.json")["2"] == [
        "n01484850",
        "great white shark",
    ]


def test_imagenet_tar_keeps_the_tar_safety_rules(tmp_path):
    members = [
        *val_images().items(),
        ("../ILSVRC2012_val_00000002.JPEG", jpeg_bytes()),
        ("ILSVRC2012_val_00000001.JPEG", jpeg_bytes((1, 2, 3))),  # a second member, same name
        ("not_a_val_name.jpg", jpeg_bytes()),
        ("ILSVRC2012_val_00000003.JPEG.txt", b"notes"),
    ]
    archive = val_tar(tmp_path, members)
    result = ingest([archive], tmp_path / "out", imagenet_meta=str(seed_meta(tmp_path / "meta")))
    assert (result.images, result.skipped_non_image) == (6, 1)
    reasons = {row["source"].split("::")[1]: row["reason"] for row in rejected(tmp_path / "out")}
    assert "climbs out" in reasons["../ILSVRC2012_val_00000002.JPEG"]
    assert reasons["ILSVRC2012_val_00000001.JPEG"].startswith("duplicate member name")
    assert "not an ImageNet validation image name" in reasons["not_a_val_name.jpg"]
    first = image_rows(tmp_path / "out", ["image"])[0]["image"]
    assert first == val_images()[val_name(1)]  # the first member of the name is kept


def test_imagenet_member_over_the_byte_cap_is_rejected_unread(tmp_path):
    images = val_images()
    cap = min(len(data) for data in images.values()) + 1
    result = ingest(
        [val_tar(tmp_path, list(images.items()))],
        tmp_path / "out",
        imagenet_meta=str(seed_meta(tmp_path / "meta")),
        max_image_bytes=cap,
    )
    too_big = sum(len(data) > cap for data in images.values())
    assert too_big > 0 and result.rejected == too_big and result.images == 6 - too_big
    assert all("over max_image_bytes" in row["reason"] for row in rejected(tmp_path / "out"))


def write_meta(root: Path, files: dict[str, str]) -> Path:
    root.mkdir(parents=True, exist_ok=True)
    for name, text in files.items():
        (root / name).write_text(text)
    return root


@pytest.mark.parametrize(
    ("files", "message"),
    [
        (
            {"ILSVRC2012_val_synsets.txt": "\n".join(GROUND_TRUTH[:4]) + "\n"},
            "ILSVRC2012_val_00000005.JPEG: file number 5 has no line in {meta}/"
            "ILSVRC2012_val_synsets.txt (it has 4 lines",
        ),
        (
            {"ILSVRC2012_val_synsets.txt": "n01440764\nn09999999\n"},
            "{meta}/ILSVRC2012_val_synsets.txt, line 2: wnid n09999999 is not in "
            "{meta}/wnid_to_label.json",
        ),
        (
            {"ILSVRC2012_val_synsets.txt": "n01440764\ntench\n"},
            "{meta}/ILSVRC2012_val_synsets.txt, line 2: expected a wnid like n01440764, "
            "found 'tench'",
        ),
        (
            {"wnid_to_label.json": json.dumps({"n01440764": ""})},
            "{meta}/wnid_to_label.json: the class name of n01440764 must be text",
        ),
    ],
)
def test_imagenet_meta_that_does_not_fit_is_a_one_line_error(tmp_path, files, message):
    meta = write_meta(seed_meta(tmp_path / "meta"), files)
    out = tmp_path / "out"
    with pytest.raises(LayoutError) as raised:
        ingest([val_tar(tmp_path)], out, imagenet_meta=str(meta))
    assert message.format(meta=meta) in str(raised.value)
    assert "\n" not in str(raised.value)
    assert not Path(datasets.side_path(str(out), "manifest.json")).exists()


@pytest.mark.parametrize(
    ("edit", "message"),
    [
        (
            lambda text: "\n".join(line for line in text.splitlines() if "00000003" not in line),
            "ILSVRC2012_val_00000003 is not listed in {meta}/LOC_val_solution.csv",
        ),
        (
            lambda text: text.replace("ILSVRC2012_val_00000004,", "ILSVRC2012_val_4,"),
            "{meta}/LOC_val_solution.csv, line {line}: expected ILSVRC2012_val_<8 digits>",
        ),
        (
            lambda text: text.replace("ImageId", "Image"),
            "{meta}/LOC_val_solution.csv, line 1: expected the header ImageId,PredictionString",
        ),
    ],
)
def test_kaggle_solution_csv_errors_name_the_file_and_line(tmp_path, edit, message):
    meta = kaggle_meta(tmp_path / "meta")
    solution = meta / "LOC_val_solution.csv"
    line = next(
        n for n, text in enumerate(solution.read_text().splitlines(), 1) if "00000004" in text
    )
    solution.write_text(edit(solution.read_text()))
    with pytest.raises(LayoutError, match=None) as raised:
        ingest(
            [write_tree(tmp_path / "val", val_images())], tmp_path / "out", imagenet_meta=str(meta)
        )
    assert message.format(meta=meta, line=line) in str(raised.value)


def test_cli_flag_reads_imagenet_and_reports_bad_meta_in_one_line(tmp_path, capsys):
    archive, meta = val_tar(tmp_path), seed_meta(tmp_path / "meta")
    out = tmp_path / "out"
    assert main(["ingest", str(archive), "--out", str(out), "--imagenet-meta", str(meta)]) == 0
    assert {row["label"] for row in image_rows(out, ["label"])} == set(LABELS.values()) - {
        "tiger shark"
    }
    (meta / "ILSVRC2012_val_synsets.txt").write_text("n01440764\n")
    assert main(["ingest", str(archive), "--out", str(out), "--imagenet-meta", str(meta)]) == 1
    error = capsys.readouterr().err.strip()
    assert "file number 2 has no line in" in error and "\n" not in error
    assert datasets.read_manifest(str(out), "images")["rows"] == 6  # the earlier output stays


def test_synset_mapping_errors_name_the_line_and_missing_meta_is_named(tmp_path):
    meta = kaggle_meta(tmp_path / "meta")
    (meta / "LOC_synset_mapping.txt").write_text("n01440764 tench\nn01443537\n")
    with pytest.raises(LayoutError, match=r"LOC_synset_mapping.txt, line 2: expected '<wnid>"):
        ingest([val_tar(tmp_path)], tmp_path / "out", imagenet_meta=str(meta))
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(LayoutError, match=r"has no ground truth file \(ILSVRC2012_val_synsets"):
        ingest([val_tar(tmp_path)], tmp_path / "out", imagenet_meta=str(empty))


COCO_IMAGES = {397133: (90, 60), 37777: (64, 48), 252219: (50, 70), 87038: (40, 40)}
COCO_CAPTIONS = {
    397133: ["A man is in a kitchen making pizzas.", "Man in apron standing on front of oven."],
    37777: ["The dining table near the kitchen has a bowl of fruit on it.", "A small kitchen.  "],
    252219: ["A person with a shopping cart on a city street."],
    87038: [],  # in 'images', never annotated
}


def coco_file(image_id: int) -> str:
    return f"{image_id:012d}.jpg"


def coco_image(image_id: int) -> bytes:
    return jpeg_bytes((image_id % 251, image_id % 127, 90), COCO_IMAGES[image_id])


def captions_json() -> dict:
    annotations = []
    # Interleaved across images, as in the real file.
    for turn in range(2):
        for image_id, captions in COCO_CAPTIONS.items():
            if turn < len(captions):
                annotations.append(
                    {"image_id": image_id, "id": len(annotations) + 1, "caption": captions[turn]}
                )
    return {
        "info": {"description": "COCO 2017 Dataset"},
        "images": [
            {"id": i, "file_name": coco_file(i), "width": w, "height": h}
            for i, (w, h) in COCO_IMAGES.items()
        ],
        "annotations": annotations,
    }


def coco_folder(root: Path, zipped=False, extra_images=None, captions=None) -> Path:
    images = {coco_file(i): coco_image(i) for i in COCO_IMAGES} | (extra_images or {})
    write_tree(
        root,
        {"annotations/captions_val2017.json": json.dumps(captions or captions_json()).encode()},
    )
    if zipped:
        with zipfile.ZipFile(root / "val2017.zip", "w", zipfile.ZIP_DEFLATED) as archive:
            for name, data in images.items():
                archive.writestr(f"val2017/{name}", data)
    else:
        write_tree(root / "val2017", images)
    return root


def expected_coco_rows():
    return [
        {"category": "coco", "concept": str(i), "captions": [c.strip() for c in COCO_CAPTIONS[i]]}
        for i in sorted(COCO_IMAGES, key=coco_file)
    ]


def test_coco_folder_rows_carry_every_caption(tmp_path):
    root = coco_folder(tmp_path / "coco", extra_images={"stray.jpg": jpeg_bytes()})
    result = ingest([root], tmp_path / "out")
    assert (result.images, result.rejected) == (4, 1)
    table = datasets.read_table(str(tmp_path / "out"), "images")
    assert table.column_names == [*IMAGES_SCHEMA.names, "captions"]
    assert str(table.schema.field("captions").type) == "list<element: string>"
    rows = table.to_pylist()
    assert [{k: row[k] for k in ("category", "concept", "captions")} for row in rows] == (
        expected_coco_rows()
    )
    by_concept = {row["concept"]: row for row in rows}
    assert by_concept["397133"]["source"] == str(root / "val2017" / coco_file(397133))
    assert (by_concept["252219"]["width"], by_concept["252219"]["height"]) == (50, 70)
    # The uncaptioned image is kept (an empty list, not null) and counted.
    assert by_concept["87038"]["captions"] == []
    report = storage.read_json(datasets.side_path(str(tmp_path / "out"), REPORT_NAME))
    assert report["coco_images_without_captions"] == 1
    assert "not listed in the 'images'" in rejected(tmp_path / "out")[0]["reason"]


def test_coco_zip_is_read_in_place_like_the_folder(tmp_path):
    columns = ["image_id", "image", "category", "concept", "captions", "width", "height"]
    folder = coco_folder(tmp_path / "folder")
    zipped = coco_folder(tmp_path / "zipped", zipped=True)
    ingest([folder], tmp_path / "from_folder")
    result = ingest([zipped], tmp_path / "from_zip")
    assert not (zipped / "val2017").exists()
    assert result.images == 4
    assert image_rows(tmp_path / "from_zip", columns) == image_rows(
        tmp_path / "from_folder", columns
    )
    sources = [row["source"] for row in image_rows(tmp_path / "from_zip", ["source"])]
    assert sources[0] == f"{zipped}/val2017.zip::val2017/{coco_file(37777)}"


@pytest.mark.filterwarnings("ignore:Duplicate name")  # the test writes a duplicate on purpose
def test_coco_zip_members_get_the_same_caps_and_checks(tmp_path):
    root = coco_folder(tmp_path / "coco", zipped=True)
    big = coco_image(397133)
    with zipfile.ZipFile(root / "val2017.zip", "a") as archive:
        archive.writestr("val2017/" + coco_file(37777), b"second member, same name")
        archive.writestr("../escape.jpg", jpeg_bytes())
    corrupt = captions_json()
    corrupt["images"].append({"id": 5, "file_name": "000000000005.jpg"})
    write_tree(root, {"annotations/captions_val2017.json": json.dumps(corrupt).encode()})
    with zipfile.ZipFile(root / "val2017.zip", "a") as archive:
        archive.writestr("val2017/000000000005.jpg", jpeg_bytes()[:60])
    result = ingest([root], tmp_path / "out", max_image_bytes=len(big) - 1)
    reasons = {row["source"].split("::")[1]: row["reason"] for row in rejected(tmp_path / "out")}
    assert "over max_image_bytes" in reasons[f"val2017/{coco_file(397133)}"]
    assert reasons[f"val2017/{coco_file(37777)}"].startswith("duplicate member name")
    assert "climbs out" in reasons["../escape.jpg"]
    assert reasons["val2017/000000000005.jpg"].startswith("cannot decode image")
    assert result.images == 3  # the first 37777, 252219 and 87038
    kept = image_rows(tmp_path / "out", ["concept", "image"])
    assert {"concept": "37777", "image": coco_image(37777)} in kept


@pytest.mark.parametrize(
    ("edit", "message"),
    [
        (
            lambda data: data["annotations"].append({"image_id": 12, "caption": "x"}),
            "captions_val2017.json: annotations[5]: image_id 12 is not an id in 'images'",
        ),
        (
            lambda data: data.pop("images"),
            "captions_val2017.json: not a COCO captions file (no 'images' list)",
        ),
        (
            lambda data: data["images"].append({"id": 1, "file_name": coco_file(37777)}),
            "captions_val2017.json: images[4]: file_name '000000037777.jpg' is listed twice",
        ),
    ],
)
def test_coco_annotations_that_do_not_fit_are_one_line_errors(tmp_path, edit, message):
    data = captions_json()
    edit(data)
    root = coco_folder(tmp_path / "coco", captions=data)
    with pytest.raises(LayoutError, match=None) as raised:
        ingest([root], tmp_path / "out")
    assert message in str(raised.value)


def test_half_a_coco_folder_says_what_is_missing(tmp_path):
    root = write_tree(tmp_path / "coco", {f"val2017/{coco_file(37777)}": coco_image(37777)})
    with pytest.raises(LayoutError, match=r"needs annotations/captions_val2017\.json"):
        ingest([root], tmp_path / "out")


def test_stages_downstream_run_on_imagenet_and_coco_datasets(tmp_path, tiny_entry):
    """Catalog, split, dedup and embed read the fixed columns and accept the new ones."""
    meta = seed_meta(tmp_path / "meta", GROUND_TRUTH * 2)
    images = {
        val_name(n): jpeg_bytes((19 * n, 240 - 17 * n, 11 * n), (32, 24)) for n in range(1, 13)
    }
    out = {name: str(tmp_path / name) for name in ("images", "catalog", "splits", "dedup", "emb")}
    ingest([val_tar(tmp_path, list(images.items()))], out["images"], imagenet_meta=str(meta))
    catalog = build_catalog(out["images"], out["catalog"], CatalogSettings(train_fraction=0.5))
    assert (catalog.categories, catalog.concepts) == (1, 3)
    split = create_concept_splits(
        out["catalog"], out["splits"], SplitSettings(concept_frac=0.5, min_concepts_threshold=2)
    )
    assert split.train_concepts == 2
    find_duplicates(out["images"], out["dedup"], DedupSettings(workers=1), out["splits"])
    embedded = embed_images(
        out["images"], out["emb"], EmbedSettings(weights="random", num_workers=0), tiny_entry
    )
    assert embedded.embedded == 12
    coco = coco_folder(tmp_path / "coco")
    ingest([coco], tmp_path / "coco_images")
    coco_catalog = build_catalog(
        str(tmp_path / "coco_images"), str(tmp_path / "cc"), CatalogSettings()
    )
    assert coco_catalog.concepts == 4
