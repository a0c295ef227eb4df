"""`embedpipe submit`: what `kfp run submit -e EXP -r RUN -f build/P.yaml k=v` does, from Python."""

from __future__ import annotations

from collections.abc import Callable, Iterable
from pathlib import Path

from kfp.cli.utils.parsing import parse_parameter_value
from kfp_server_api.exceptions import ApiException

from embedpipe.config import ConfigError
from embedpipe.pipelines.compile import read_pipeline_spec


def pipeline_inputs(package: str | Path) -> dict[str, dict]:
    """Parameter name -> its spec (type, default) from the compiled YAML."""
    inputs = read_pipeline_spec(package)["root"].get("inputDefinitions", {})
    return inputs.get("parameters", {})


def parse_params(pairs: Iterable[str], package: str | Path) -> dict:
    """`key=value` pairs, values parsed as the kfp CLI does (JSON where it parses)."""
    known = pipeline_inputs(package)
    params = {}
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
