from pathlib import Path

import pytest

from embedpipe.config import ConfigError, load_settings

REPO = Path(__file__).resolve().parents[2]


def write(tmp_path, text):
    path = tmp_path / "config.toml"
    path.write_text(text)
    return str(path)


def test_shipped_demo_config_loads():
    settings = load_settings(str(REPO / "configs" / "demo.toml"))
    assert settings.paths.sources == ["demo/data"]
    assert settings.images.data_image == "ghcr.io/embedpipe/embedpipe-data:0.1.0"


def test_defaults_match_the_perva_scripts():
    settings = load_settings()
    assert (settings.catalog.train_fraction, settings.catalog.seed) == (0.2, 42)
    assert settings.catalog.num_train is None and settings.catalog.relative is False
    split = settings.split
    assert (
        split.concept_frac,
        split.min_concepts_threshold,
        split.test_sample_frac,
        split.max_test_images,
        split.seed,
    ) == (0.65, 3, 1.0, 200, 23)


def test_unknown_keys_are_named(tmp_path):
    path = write(tmp_path, "[catalog]\nseed = 1\nnum_trian = 3\n[bogus]\nx = 1\n")
    with pytest.raises(ConfigError) as error:
        load_settings(path)
    message = str(error.value)
    assert path in message
    assert "[catalog].num_trian: unknown key" in message
    assert "bogus: unknown key" in message


def test_bad_values_name_the_key_and_value(tmp_path):
    path = write(tmp_path, "[split]\nconcept_frac = 1.5\n")
    with pytest.raises(
        ConfigError,
        match=r"\[split\]\.concept_frac: .*less than or equal to 1"
        r".*got 1\.5",
    ):
        load_settings(path)


def test_flags_override_the_file_and_unset_flags_do_not(tmp_path):
    path = write(tmp_path, "[catalog]\nseed = 1\ntrain_fraction = 0.5\n")
    settings = load_settings(path, {"catalog.seed": 9, "catalog.train_fraction": None})
    assert (settings.catalog.seed, settings.catalog.train_fraction) == (9, 0.5)


def test_invalid_toml_and_missing_file_name_the_file(tmp_path):
    with pytest.raises(ConfigError, match=r"config\.toml: not valid TOML"):
        load_settings(write(tmp_path, "[catalog\n"))
    with pytest.raises(ConfigError, match=r"nope\.toml: config file not found"):
        load_settings(str(tmp_path / "nope.toml"))


def test_settings_are_frozen():
    settings = load_settings()
    with pytest.raises(ValueError):
        settings.catalog.seed = 3


def test_shipped_cluster_config_and_overlays_load():
    for overlay in sorted((REPO / "manifests" / "overlays").iterdir()):
        settings = load_settings(
            str(REPO / "configs" / "cluster.toml"), layers=(overlay / "cluster.toml",)
        )
        assert settings.cluster.object_store_secret == "embedpipe-object-store"
        assert settings.embed.model == "clip_vitb32"  # the overlay keeps the base's other keys


def test_a_layer_replaces_keys_within_sections_and_flags_still_win(tmp_path):
    base = tmp_path / "base.toml"
    base.write_text('[images]\nregistry = "r.example"\ntag = "1"\n[embed]\nbatch_size = 8\n')
    layer = tmp_path / "cluster.toml"
    layer.write_text(
        '[images]\ntag = "2"\n[cluster]\ngpu_node_selector = { pool = "b200" }\n'
        'gpu_tolerations = [{ key = "gpu", operator = "Equal", value = "yes" }]\n'
    )
    settings = load_settings(str(base), {"embed.batch_size": 16}, layers=(layer,))
    assert settings.images.data_image == "r.example/embedpipe-data:2"
    assert settings.cluster.gpu_node_selector == {"pool": "b200"}
    assert settings.cluster.gpu_tolerations[0].value == "yes"
    assert settings.embed.batch_size == 16


def test_bad_cluster_settings_name_the_layer_and_key(tmp_path):
    layer = tmp_path / "cluster.toml"
    layer.write_text('[cluster]\ngpu_tolerations = [{ key = "gpu", operator = "Equal" }]\n')
    with pytest.raises(
        ConfigError,
        match=r"(?s)cluster.toml: invalid.*\[cluster\].gpu_tolerations.0: .*needs a value",
    ):
        load_settings(None, layers=(layer,))
    layer.write_text('registry = "x"\n')
    with pytest.raises(ConfigError, match="top-level key 'registry' must be a \\[section\\]"):
        load_settings(None, layers=(layer,))
    with pytest.raises(ConfigError, match=r"missing\.toml: config file not found"):
        load_settings(None, layers=(tmp_path / "missing.toml",))


def test_the_readme_settings_reference_is_generated_from_the_models():
    from embedpipe.config.reference import replace_block

    readme = (REPO / "README.md").read_text(encoding="utf-8")
    assert replace_block(readme) == readme, "run: python -m embedpipe.config.reference README.md"


def test_a_flag_error_names_the_flag_and_a_file_error_the_key(tmp_path):
    from embedpipe.config import ConfigError, load_settings

    labels = {"ingest.workers": "--workers"}
    with pytest.raises(ConfigError, match=r"--workers: Input should be greater than or equal"):
        load_settings(None, {"ingest.workers": -1}, labels=labels)
    config = tmp_path / "c.toml"
    config.write_text("[ingest]\nworkers = -1\n")
    with pytest.raises(ConfigError, match=r"\[ingest\]\.workers: Input should be"):
        load_settings(str(config), {"ingest.workers": None}, labels=labels)


def test_overrides_are_checked_per_stage_and_compile_time_keys_are_refused():
    from embedpipe.config import ConfigError, Settings, check_overrides, stage_settings

    settings = Settings()
    compiled = {stage: settings.section(stage) for stage in ("dedup", "embed")}
    assert stage_settings("dedup", compiled["dedup"], {"max_distance": 2}).max_distance == 2
    with pytest.raises(ConfigError) as raised:
        check_overrides(
            compiled, {"dedup": {"max_distanse": 2}, "embed": {"model": "x"}, "mine": {"top_k": 2}}
        )
    message = str(raised.value)
    assert "[mine]: overrides given, but this pipeline has no mine step" in message
    assert "[dedup].max_distanse: unknown key" in message
    assert "[embed].model: set when the pipeline is compiled" in message
    check_overrides(compiled, {"dedup": {}, "embed": {"batch_size": 8}, "mine": {}})


@pytest.mark.parametrize(
    ("line", "problem"),
    [
        ("[ingest]\nrows_per_shard = true", "[ingest].rows_per_shard: expected a number, got True"),
        ('[ingest]\nrows_per_shard = "5"', "[ingest].rows_per_shard: expected a number, got '5'"),
        ("[ingest]\nrows_per_shard = 5.5", "[ingest].rows_per_shard: expected an integer"),
        ('[catalog]\nrelative = "yes"', "[catalog].relative: expected true or false, got 'yes'"),
        ("[catalog]\nrelative = 1", "[catalog].relative: expected true or false, got 1"),
        ("[mine]\nquery_splits = [1]", "[mine].query_splits: expected text, got 1"),
        ("[embed]\nmodel = 3", "[embed].model: expected text, got 3"),
    ],
)
def test_values_are_not_coerced_across_types(tmp_path, line, problem):
    with pytest.raises(ConfigError) as raised:
        load_settings(str(write(tmp_path, line + "\n")))
    assert problem in str(raised.value)


def test_integral_floats_from_kfp_dicts_still_fill_integer_keys():
    from embedpipe.config import stage_settings

    assert stage_settings("ingest", {"rows_per_shard": 5000.0}, {}).rows_per_shard == 5000


def test_config_files_that_cannot_be_read_are_one_line_errors(tmp_path):
    latin1 = tmp_path / "latin1.toml"
    latin1.write_bytes(b"[ingest]\n# caf\xe9\n")
    with pytest.raises(ConfigError, match=r"latin1.toml: not UTF-8 text \(byte 14\)"):
        load_settings(str(latin1))
    with pytest.raises(ConfigError, match="is a folder, not a TOML config file"):
        load_settings(str(tmp_path))


def test_the_loss_names_are_the_loss_registrys():
    from typing import get_args

    from embedpipe.config import TrainSettings
    from embedpipe.train.losses import list_losses

    assert sorted(get_args(TrainSettings.model_fields["loss"].annotation)) == list_losses()


def test_image_text_finetuning_refuses_exactly_the_losses_that_need_negatives():
    from embedpipe.config import TrainSettings
    from embedpipe.train.losses import list_losses, needs_negatives

    for name in list_losses():
        TrainSettings(loss=name, mode="head", pairs="image_image")
        TrainSettings(loss=name, pairs="image_image")
        if needs_negatives(name):
            with pytest.raises(ValueError, match=f"loss: {name} compares images with images"):
                TrainSettings(loss=name)
        else:
            TrainSettings(loss=name)
