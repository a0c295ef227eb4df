"""Every option is declared once: the settings models, the CLI, the components and the
compiled pipelines must agree on every field of every stage.

These are the tests that would have caught `[mine] ivf_nprobe` being honoured by
`embedpipe mine` and silently dropped by `embedpipe run mine`.
"""

import inspect
import types
from typing import Literal, Union, get_args, get_origin

import pytest

from embedpipe.cli import main
from embedpipe.cli.flags import flag_name
from embedpipe.cli.stages import STAGE_COMMANDS
from embedpipe.components import COMPONENTS
from embedpipe.config import STAGE_SETTINGS, has_flag, is_compile_time, load_settings
from embedpipe.pipelines import PIPELINE_NAMES
from embedpipe.pipelines.compile import compile_pipelines, read_pipeline_spec

# Values a generic rule cannot pick: names that must exist, fields checked together.
CHOSEN = {
    ("embed", "model"): "clip_vitb16",
    ("mine", "band_names"): ("low", "high"),
    ("mine", "band_quantiles"): (0.4,),
    ("mine", "rank_max"): 40,  # holds top_k candidates past rank_min
    ("ingest", "split_dirnames"): ("fit", "holdout"),
    ("taxonomy", "table"): "/data/Taxon.tsv",
    ("taxonomy", "val_fraction"): 0.25,
    ("embed", "device"): "cpu",
    ("train", "device"): "cpu",
    ("train", "model"): "clip_vitb16",
    ("train", "templates"): ("a {concept}", "{category}"),
    ("train", "best_metric"): "val_recall_at_5",
    ("train", "val_k"): (1, 10),
    ("train", "nested_dims"): (16, 32),
    ("train", "lock_image"): True,
    ("train", "lock_text"): True,
    ("train", "nproc_per_node"): 1,  # > 1 would train under torchrun
    ("train", "labels"): "concept",
    ("evaluate", "tasks"): ("zeroshot", "anomaly"),
    ("evaluate", "recall_k"): (2, 3),
    ("evaluate", "templates"): ("a sketch of a {c}.",),
    ("tune", "space"): {
        "lr": {"type": "float", "low": 1e-05, "high": 0.01, "log": True},
        "loss": {"type": "categorical", "choices": ["infonce", "pairwise_sigmoid"]},
        "mine.margin": {"type": "float", "low": 0.0, "high": 0.1},  # a mine-negatives step
    },
    ("tune", "metric"): "val_recall_at_1",
    ("tune", "backend"): "katib",  # compiles the Katib launcher; the CLI's run is stubbed
}
# The library function each stage's settings reach: (module, function).
ENTRY_POINTS = {
    "ingest": ("embedpipe.data.ingest", "ingest_images"),
    "catalog": ("embedpipe.data.catalog", "build_catalog"),
    "split": ("embedpipe.data.split", "create_concept_splits"),
    "taxonomy": ("embedpipe.taxonomy.stage", "build_taxonomy"),
    "dedup": ("embedpipe.data.dedup", "find_duplicates"),
    "embed": ("embedpipe.embed.images", "embed_images"),
    "mine": ("embedpipe.mining.mine", "mine_category"),
    "combine": ("embedpipe.mining.combine", "combine_negatives"),
    "to_hf": ("embedpipe.mining.to_hf", "export_to_hf"),
    "train": ("embedpipe.train.stage", "train_model"),
    "tune": ("embedpipe.tune.study", "tune_model"),
    "publish": ("embedpipe.publish.stage", "publish_checkpoint"),
    "evaluate": ("embedpipe.evaluate.stage", "evaluate_models"),
}
# Stages whose KFP component and pipeline step land later (the integrator removes them).


def _other_value(stage: str, key: str, field):
    """A valid value different from the default."""
    if (stage, key) in CHOSEN:
        return CHOSEN[(stage, key)]
    default = field.get_default(call_default_factory=True)
    annotation = field.annotation
    origin, args = get_origin(annotation), get_args(annotation)
    if origin in (Union, types.UnionType):
        annotation = next(arg for arg in args if arg is not type(None))
        origin, args = get_origin(annotation), get_args(annotation)
    if annotation is bool:
        return not default
    if origin is Literal:
        return next(choice for choice in args if choice != default)
    if annotation is int:
        return (default or 1) + 1
    if annotation is float:
        return default / 2 if default else 0.5
    if annotation is str:
        return f"{key}-value"
    if origin is tuple:
        return (*default, "extra")
    raise AssertionError(f"[{stage}].{key}: no rule for {annotation!r}; add it to CHOSEN")


def _changed(stage: str, only=lambda field: True) -> dict:
    model = STAGE_SETTINGS[stage]
    return {
        key: _other_value(stage, key, field)
        for key, field in model.model_fields.items()
        if only(field)
    }


def _toml_value(value) -> str:
    if isinstance(value, dict):
        return "{" + ", ".join(f"{k} = {_toml_value(v)}" for k, v in value.items()) + "}"
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, tuple | list):
        return "[" + ", ".join(_toml_value(v) for v in value) + "]"
    if isinstance(value, str):
        return f'"{value}"'
    return repr(value)


def _config_with(tmp_path, values: dict[str, dict]) -> str:
    lines = []
    for stage, keys in values.items():
        lines.append(f"[{stage}]")
        lines += [f"{key} = {_toml_value(value)}" for key, value in keys.items()]
    path = tmp_path / "changed.toml"
    path.write_text("\n".join(lines) + "\n")
    return str(path)


class Reached(Exception):
    """Raised by a stubbed stage entry point once it has seen its settings."""


@pytest.fixture
def captured(monkeypatch):
    """Stub every stage's library entry point; record the settings each receives."""
    import importlib

    seen = {}
    for stage, (module, function) in ENTRY_POINTS.items():
        model = STAGE_SETTINGS[stage]

        def stub(*args, _stage=stage, _model=model, **kwargs):
            (config,) = [a for a in (*args, *kwargs.values()) if isinstance(a, _model)]
            seen[_stage] = config
            raise Reached(_stage)

        monkeypatch.setattr(importlib.import_module(module), function, stub)
    return seen


def _flag_argv(stage: str, values: dict) -> list[str]:
    argv = []
    for key, value in values.items():
        if isinstance(value, bool):
            argv.append(flag_name(key) if value else "--no-" + flag_name(key)[2:])
        elif isinstance(value, tuple):
            argv += [flag_name(key), ",".join(str(v) for v in value)]
        else:
            argv += [flag_name(key), str(value)]
    return argv


INPUTS = {  # positional inputs and --out of each command
    "ingest": ["src"],
    "catalog": ["images"],
    "split": ["catalog"],
    "taxonomy": ["images"],
    "dedup": ["images"],
    "embed": ["images"],
    "embed-text": ["texts.txt"],
    "embed-signal": ["images", "--column", "signal"],
    "mine": ["metadata", "embeddings"],
    "combine": ["negatives"],
    "to-hf": ["negatives", "images"],
    "train": ["images"],
    "tune": ["images"],
    "publish": ["checkpoint"],
    "evaluate": ["metadata", "--embeddings", "embeddings"],
}


def _run_command(command, argv: list[str]) -> None:
    with pytest.raises(Reached):
        main([command.name, *INPUTS[command.name], "--out", "out", *argv])


@pytest.mark.parametrize("command", STAGE_COMMANDS, ids=lambda c: c.name)
def test_every_flag_and_every_config_key_reaches_the_stage(
    command, captured, tmp_path, monkeypatch
):
    if command.name == "embed-text":
        monkeypatch.setattr("embedpipe.embed.texts.embed_texts", captured_stub(captured))
    if command.name == "embed-signal":
        monkeypatch.setattr("embedpipe.embed.signals.embed_signals", captured_stub(captured))
    if command.name == "tune":  # with backend katib the launcher is what receives [tune]

        def launch(name, tune, *args, **kwargs):
            captured["tune"] = tune
            raise Reached("tune")

        monkeypatch.setattr("embedpipe.tune.katib.launch_search", launch)
    if command.name == "mine":  # the inputs are split by category before the stage runs
        monkeypatch.setattr("embedpipe.mining.partition.split_by_category", lambda *a: {"c": "p"})
    stage, model = command.stage, STAGE_SETTINGS[command.stage]

    flagged = _changed(stage, has_flag)
    assert flagged or stage in ("combine", "to_hf"), stage
    _run_command(command, _flag_argv(stage, flagged))
    expected = model(**flagged)
    assert captured[stage] == expected

    everything = _changed(stage)
    _run_command(command, ["--config", _config_with(tmp_path, {stage: everything})])
    assert captured[stage] == model(**everything)


def captured_stub(seen):
    def stub(uri, out_uri, config, *args):
        seen["embed"] = config
        raise Reached("embed")

    return stub


def test_every_field_has_a_description_and_compile_time_fields_no_run_override():
    for stage, model in STAGE_SETTINGS.items():
        for key, field in model.model_fields.items():
            assert field.description, f"[{stage}].{key} has no description"
    assert {c.stage for c in STAGE_COMMANDS} == set(STAGE_SETTINGS)


@pytest.fixture(scope="module")
def everything_compiled(tmp_path_factory):
    """Every pipeline compiled from a config where every stage key differs from its default."""
    tmp_path = tmp_path_factory.mktemp("parity")
    values = {stage: _changed(stage) for stage in STAGE_SETTINGS}
    values["embed"]["model"] = "clip_vitb32"
    settings = load_settings(_config_with(tmp_path, values))
    compile_pipelines(settings, str(tmp_path))
    return settings, {
        name: read_pipeline_spec(tmp_path / f"{name}.yaml") for name in PIPELINE_NAMES
    }


def _tasks(spec: dict):
    """Every task of the pipeline, sub-DAGs (ParallelFor) included."""
    yield from spec["root"]["dag"]["tasks"].items()
    for component in spec["components"].values():
        yield from component.get("dag", {}).get("tasks", {}).items()


# Launcher steps that run their stage elsewhere (a Katib Experiment, a TrainJob).
LAUNCHERS = {"tune-katib": "tune", "train-job": "train", "mine-negatives": "mine"}


def _stage(task_name: str) -> str:
    return LAUNCHERS.get(task_name, task_name).replace("-", "_")


def _other_stages(parameters: dict) -> list[str]:
    """The stages whose section and overrides a step takes besides its own (``X_settings``
    and ``X_overrides``)."""
    return [name.removesuffix("_settings") for name in parameters if name.endswith("_settings")]


def _constant(task: dict, name: str):
    return task["inputs"]["parameters"][name]["runtimeValue"]["constant"]


def test_each_step_gets_exactly_its_stage_section(everything_compiled):
    from embedpipe.config import stage_settings

    settings, specs = everything_compiled
    reached = set()
    for name, spec in specs.items():
        checked = None
        for task_name, task in _tasks(spec):
            if task_name == "check-settings":
                checked = _constant(task, "settings")
                continue
            if "settings" not in task.get("inputs", {}).get("parameters", {}):
                continue
            stage = _stage(task_name)
            parameters = task["inputs"]["parameters"]
            compiled = _constant(task, "settings")
            assert compiled == settings.section(stage), (name, stage)
            # Through the YAML (where KFP makes every number a float) and back.
            assert stage_settings(stage, compiled, {}) == getattr(settings, stage)
            for other in _other_stages(parameters):  # a search gets [train], [mine], [combine]
                assert _constant(task, f"{other}_settings") == settings.section(other)
                assert parameters[f"{other}_overrides"]["componentInputParameter"] == other
            overrides = parameters["overrides"]
            if "taskOutputParameter" in overrides:
                # a final training (and re-mining, with searched [mine] filters) after a
                # search (the tune and end-to-end pipelines): the search's best on the run's
                # overrides
                assert name in ("tune", "end_to_end") and stage in ("train", "mine"), (name, stage)
                producer = overrides["taskOutputParameter"]["producerTask"]
                assert _stage(producer) == "tune", producer
            else:
                # Inside a ParallelFor the run parameter arrives as a channel of that name.
                overrides = overrides["componentInputParameter"]
                assert overrides.removeprefix("pipelinechannel--") == stage, (name, stage)
            reached.add(stage)
        stages = {_stage(t) for t, task in _tasks(spec) if "overrides" in str(task)}
        stages |= {
            other
            for _, task in _tasks(spec)
            for other in _other_stages(task.get("inputs", {}).get("parameters", {}))
        }
        assert checked == {stage: settings.section(stage) for stage in stages}, name
        run_parameters = set(spec["root"]["inputDefinitions"]["parameters"])
        assert stages <= run_parameters
    assert reached == set(STAGE_SETTINGS)


def test_the_check_step_takes_every_stage():
    check = COMPONENTS["check_settings"][0]
    expected = {"settings", *STAGE_SETTINGS}
    assert set(inspect.signature(check).parameters) == expected


def _artifact(path="artifact"):
    return types.SimpleNamespace(path=path, uri=path, metadata={})


def _component_arguments(function, stage: str, settings: dict, overrides: dict) -> dict:
    arguments = {}
    for name in inspect.signature(function).parameters:
        if name == "settings":
            arguments[name] = settings
        elif name == "overrides":
            arguments[name] = overrides
        elif name.endswith("_settings"):  # a search's [train], [mine] and [combine]
            arguments[name] = STAGE_SETTINGS[name.removesuffix("_settings")]().model_dump(
                mode="json"
            )
        elif name.endswith("_overrides"):
            arguments[name] = {}
        elif name == "category":
            arguments[name] = "c"
        elif name == "sources":
            arguments[name] = ["src"]
        elif name == "model_entry":
            from embedpipe.models.registry import get_entry

            arguments[name] = get_entry("clip_vitb32").model_dump_json()
        elif name == "models":
            arguments[name] = "{}"
        elif name == "per_category":
            arguments[name] = [_artifact()]
        else:
            arguments[name] = _artifact()
    return arguments


@pytest.mark.parametrize("stage", list(ENTRY_POINTS))
def test_every_field_reaches_the_stage_through_its_component(stage, captured, monkeypatch):
    """What `embedpipe run` and the cluster execute: the component body, given the compiled
    section (every field changed), or the defaults plus the run's overrides."""
    monkeypatch.setattr("embedpipe.mining.partition.read_partitions", lambda uri: {"c": "p"})
    (function, _), model = COMPONENTS[stage], STAGE_SETTINGS[stage]
    changed = _changed(stage)
    changed.setdefault("model", "clip_vitb32") if stage == "embed" else None
    compiled = model(**changed).model_dump(mode="json", exclude_none=True)
    with pytest.raises(Reached):
        function(**_component_arguments(function, stage, compiled, {}))
    assert captured[stage] == model(**changed)

    run_time = {k: v for k, v in changed.items() if not is_compile_time(model.model_fields[k])}
    defaults = model().model_dump(mode="json", exclude_none=True)
    overrides = model(**{**model().model_dump(), **run_time}).model_dump(mode="json")
    overrides = {k: overrides[k] for k in run_time}
    with pytest.raises(Reached):
        function(**_component_arguments(function, stage, defaults, overrides))
    assert captured[stage] == model(**{**model().model_dump(), **run_time})
