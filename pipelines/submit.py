"""`embedpipe submit`: what `kfp run submit -e EXP -r RUN -f build/P.yaml k=v` does, from Python."""

from __future__ import annotations

from collections.abc import Callable, Iterable
from pathlib import Path

from kfp.cli.utils.parsing import parse_parameter_value
from kfp_server_api.exceptions import ApiException

from embedpipe.config import STAGE_SETTINGS, ConfigError, check_overrides
from embedpipe.pipelines.compile import compiled_stage_settings, read_pipeline_spec


def pipeline_inputs(package: str | Path) -> dict[str, dict]:
    """Parameter name -> its spec (type, default) from the compiled YAML."""
    inputs = read_pipeline_spec(package)["root"].get("inputDefinitions", {})
    return inputs.get("parameters", {})


def parse_params(pairs: Iterable[str], package: str | Path, overrides: Iterable[str] = ()) -> dict:
    """`key=value` pairs, values parsed as the kfp CLI does (JSON where it parses), and
    `stage.key=value` overrides merged into each stage's parameter; every stage's settings
    are validated against the compiled defaults before anything is sent."""
    known = pipeline_inputs(package)
    params: dict = {}
    for pair in pairs:
        key, sep, value = pair.partition("=")
        if not sep or not key:
            raise ConfigError(f"--param {pair!r}: expected key=value")
        if key not in known:
            raise ConfigError(
                f"--param {key}: {Path(package).name} has no such parameter "
                f"(it has: {', '.join(sorted(known))})"
            )
        params[key] = parse_parameter_value(value)
    for pair in overrides:
        dotted, sep, value = pair.partition("=")
        stage, _, key = dotted.partition(".")
        if not sep or not key:
            raise ConfigError(f"--set {pair!r}: expected stage.key=value")
        if stage not in compiled_stage_settings(package):
            raise ConfigError(f"--set {dotted}: {Path(package).name} has no {stage} step")
        current = params.setdefault(stage, {})
        if not isinstance(current, dict):
            raise ConfigError(f"--param {stage}: expected a JSON object of {stage} settings")
        current[key] = parse_parameter_value(value)
    check_overrides(
        compiled_stage_settings(package),
        {stage: value for stage, value in params.items() if stage in STAGE_SETTINGS},
    )
    required = [name for name, spec in known.items() if "defaultValue" not in spec]
    missing = [
        name for name in required if name not in params and not known[name].get("isOptional")
    ]
    if missing:
        raise ConfigError(f"{Path(package).name} needs --param for: {', '.join(sorted(missing))}")
    return params


def submit(
    client_factory: Callable[[], object],
    package: str | Path,
    params: dict,
    *,
    experiment: str,
    run_name: str,
    service_account: str | None = None,
) -> str:
    """Start one run of a compiled pipeline; returns the run id."""
    if not Path(package).is_file():
        raise ConfigError(f"{package}: not compiled; run `make compile` (or `make deploy`) first")
    client = client_factory()
    try:
        result = client.create_run_from_pipeline_package(
            str(package),
            arguments=params,
            run_name=run_name,
            experiment_name=experiment,
            service_account=service_account,
        )
    except ApiException as error:
        raise RuntimeError(
            f"submitting {Path(package).name} failed: HTTP {error.status} {error.reason}"
        ) from None
    return result.run_id
