import json
import subprocess
import sys
from pathlib import Path

import pytest

from embedpipe.cli import main
from embedpipe.core import datasets, storage

COMMANDS = [
    "ingest",
    "catalog",
    "split",
    "taxonomy",
    "dedup",
    "embed",
    "embed-text",
    "models",
    "demo-data",
    "run",
    "compile",
]


@pytest.mark.parametrize("command", COMMANDS)
def test_every_subcommand_has_help(command, capsys):
    with pytest.raises(SystemExit) as exit_info:
        main([command, "--help"])
    assert exit_info.value.code == 0
    assert "usage: embedpipe " + command in capsys.readouterr().out


def test_top_level_help_lists_the_commands(capsys):
    with pytest.raises(SystemExit):
        main(["--help"])
    out = capsys.readouterr().out
    assert all(command in out for command in COMMANDS)


def test_version_via_python_dash_m():
    done = subprocess.run(
        [sys.executable, "-m", "embedpipe", "--version"], capture_output=True, text=True, check=True
    )
    assert done.stdout.startswith("embedpipe 0.1.0")


def test_stage_commands_chain_and_flags_override_the_config(demo_dir, tmp_path, capsys):
    config = tmp_path / "c.toml"
    config.write_text("[ingest]\nworkers = 1\nrows_per_shard = 100\n[catalog]\nnum_train = 3\n")
    assert (
        main(
            [
                "ingest",
                str(demo_dir),
                "--out",
                str(tmp_path / "i"),
                "--config",
                str(config),
                "--rows-per-shard",
                "200",
            ]
        )
        == 0
    )
    ingest = json.loads(capsys.readouterr().out)
    assert (ingest["images"], ingest["rejected"], ingest["shards"]) == (408, 3, 3)
    assert (
        main(
            [
                "catalog",
                str(tmp_path / "i"),
                "--out",
                str(tmp_path / "c"),
                "--config",
                str(config),
                "--num-train",
                "2",
                "--relative",
            ]
        )
        == 0
    )
    catalog = json.loads(capsys.readouterr().out)
    assert catalog["train_images"] == 2 * 20
    saved = storage.read_json(datasets.side_path(str(tmp_path / "c"), datasets.CONFIG_NAME))
    assert saved["config"]["num_train"] == 2 and saved["config"]["relative"] is True
    assert (
        main(
            [
                "split",
                str(tmp_path / "c"),
                "--out",
                str(tmp_path / "s"),
                "--concept-frac",
                "0.4",
                "--seed",
                "1",
            ]
        )
        == 0
    )
    assert json.loads(capsys.readouterr().out)["train_concepts"] == 2 * 4
    assert datasets.read_manifest(str(tmp_path / "s"))["kind"] == "splits"


def test_boolean_flags_refuse_other_words(capsys):
    with pytest.raises(SystemExit):
        main(["taxonomy", "x", "--out", "y", "--keep-genus-in-train", "maybe"])
    assert "unrecognized arguments: maybe" in capsys.readouterr().err


def test_errors_name_the_problem_and_exit_non_zero(tmp_path, capsys):
    assert main(["ingest", str(tmp_path / "absent"), "--out", str(tmp_path / "o")]) == 1
    assert "absent: source does not exist" in capsys.readouterr().err
    bad = tmp_path / "bad.toml"
    bad.write_text("[ingest]\nworkers = -1\n")
    assert main(["ingest", str(tmp_path), "--out", str(tmp_path / "o"), "--config", str(bad)]) == 2
    assert "[ingest].workers" in capsys.readouterr().err


def test_demo_data_command(tmp_path, capsys):
    assert (
        main(
            [
                "demo-data",
                str(tmp_path / "d"),
                "--categories",
                "2",
                "--concepts",
                "2",
                "--images",
                "4",
            ]
        )
        == 0
    )
    assert "2 exact and 2 near duplicates, 3 corrupt" in capsys.readouterr().out
    assert (
        len(list(Path(tmp_path / "d").rglob("*.jpg")))
        + len(list(Path(tmp_path / "d").rglob("*.png")))
        == 2 * 2 * 4 + 2 + 2 + 3
    )


def test_taxonomy_command(tmp_path, capsys):
    from gbif import write_images, write_table

    root = write_images(tmp_path / "src", per_name=2)
    assert main(["ingest", str(root), "--out", str(tmp_path / "i"), "--workers", "1"]) == 0
    capsys.readouterr()
    table = write_table(tmp_path / "Taxon.tsv")
    assert main(["taxonomy", str(tmp_path / "i"), "--out", str(tmp_path / "t")]) == 2
    assert "give --table" in capsys.readouterr().err
    args = [
        "taxonomy",
        str(tmp_path / "i"),
        "--out",
        str(tmp_path / "t"),
        "--table",
        str(table),
        "--kingdom",
        "Animalia",
        "--split-mode",
        "images",
        "--test-fraction",
        "0.5",
        "--no-keep-genus-in-train",
    ]
    assert main(args) == 0
    result = json.loads(capsys.readouterr().out)
    assert (result["known_names"], result["train_images"], result["test_images"]) == (
        11,
        11,
        11,
    )  # Agathis montana: the wasp
    saved = storage.read_json(datasets.side_path(str(tmp_path / "t"), datasets.CONFIG_NAME))[
        "config"
    ]
    assert saved["keep_genus_in_train"] is False and saved["kingdom"] == "Animalia"


def test_models_dedup_and_embed_commands(demo_images, tmp_path, capsys):
    from conftest import TINY_OPEN_CLIP

    assert main(["models"]) == 0
    listing = capsys.readouterr().out.splitlines()
    assert listing[0].split()[:3] == ["name", "library", "architecture"]
    assert any(line.split()[0] == "clip_rn50x64" and "128" in line.split() for line in listing)
    assert (
        main(
            [
                "dedup",
                demo_images,
                "--out",
                str(tmp_path / "d"),
                "--drop",
                "duplicates",
                "--workers",
                "1",
            ]
        )
        == 0
    )
    dedup = json.loads(capsys.readouterr().out)
    assert (dedup["groups"], dedup["dropped"], dedup["kept"]) == (8, 8, 400)
    config = tmp_path / "m.toml"
    inline = json.dumps(TINY_OPEN_CLIP).replace('":', '" =')
    config.write_text(
        '[models.tiny]\nlibrary = "open_clip"\narchitecture = "embedpipe-tiny"\n'
        f"embed_dim = 64\nimage_size = 64\ntext = true\nopen_clip_config = {inline}\n"
    )
    common = [
        "--config",
        str(config),
        "--model",
        "tiny",
        "--weights",
        "random",
        "--num-workers",
        "0",
    ]
    assert (
        main(
            [
                "embed",
                demo_images,
                "--out",
                str(tmp_path / "e"),
                "--select",
                str(tmp_path / "d" / "kept"),
                *common,
            ]
        )
        == 0
    )
    assert json.loads(capsys.readouterr().out)["embedded"] == 400  # one row per group kept
    (tmp_path / "p.txt").write_text("a photo of a box\na photo of a star\n")
    assert main(["embed-text", str(tmp_path / "p.txt"), "--out", str(tmp_path / "t"), *common]) == 0
    assert json.loads(capsys.readouterr().out)["embedded"] == 2


def test_mine_combine_and_to_hf_commands(demo_images, tmp_path, capsys):
    import datasets as hf
    from conftest import random_embeddings

    random_embeddings(demo_images, tmp_path, dim=8)
    assert (
        main(
            [
                "mine",
                str(tmp_path / "meta"),
                str(tmp_path / "emb"),
                "--out",
                str(tmp_path / "m"),
                "--category",
                "disc",
                "--category",
                "star",
                "--top-k",
                "2",
            ]
        )
        == 0
    )
    mined = json.loads(capsys.readouterr().out)
    assert [r["category"] for r in mined] == ["disc", "star"]
    assert (
        main(
            [
                "mine",
                str(tmp_path / "meta"),
                str(tmp_path / "emb"),
                "--out",
                str(tmp_path / "x"),
                "--category",
                "boats",
            ]
        )
        == 1
    )
    assert "no category boats" in capsys.readouterr().err
    outs = [str(tmp_path / "m" / "negatives" / c) for c in ("disc", "star")]
    assert main(["combine", *outs, "--out", str(tmp_path / "c"), "--num-samples", "30"]) == 0
    assert json.loads(capsys.readouterr().out)["rows"] == 30
    assert main(["to-hf", str(tmp_path / "c"), demo_images, "--out", str(tmp_path / "hf")]) == 0
    assert json.loads(capsys.readouterr().out)["rows"] == 30
    assert len(hf.load_from_disk(str(tmp_path / "hf"))) == 30


def test_demo_data_help_states_the_generators_own_defaults():
    import dataclasses

    from embedpipe.cli import DEMO_FLAGS
    from embedpipe.data.demo_data import DemoSpec

    defaults = {field.name: field.default for field in dataclasses.fields(DemoSpec)}
    for key, help_text in DEMO_FLAGS.items():
        assert help_text.endswith(f"(default: {defaults[key]})"), key
