"""One training process under torchrun, started by ``embedpipe.train.launch`` with a JSON
spec that ``write_spec`` writes: the inputs, the output, the settings, the model entry,
the launcher's log level and the file rank 0 writes the result to."""

from __future__ import annotations

import json
import logging
import os
import signal
import sys
from dataclasses import asdict

from embedpipe import LOG_FORMAT
from embedpipe.config import TrainSettings
from embedpipe.models.registry import ModelEntry
from embedpipe.train.inputs import TrainInputs


def write_spec(
    path: str,
    inputs: TrainInputs,
    out_uri: str,
    config: TrainSettings,
    entry: ModelEntry,
    result_path: str,
    models: dict | None = None,
) -> None:
    spec = {
        "inputs": inputs.to_dict(),
        "out": out_uri,
        "settings": config.model_dump(mode="json"),
        "entry": entry.model_dump(mode="json"),
        "models": models or {},
        "log_level": logging.getLogger().getEffectiveLevel(),
        "result": result_path,
    }
    with open(path, "w", encoding="utf-8") as handle:
        json.dump(spec, handle)


def _unwind(signum: int, frame) -> None:
    """SIGTERM (the launcher stopping its workers) unwinds every ``with`` block, as in the
    command line: staging folders and temporary files are removed."""
    raise SystemExit(128 + signum)


def main(spec_path: str) -> int:
    from embedpipe.train.stage import train_model

    with open(spec_path, encoding="utf-8") as handle:
        spec = json.load(handle)
    logging.basicConfig(level=spec["log_level"], format=LOG_FORMAT)
    signal.signal(signal.SIGTERM, _unwind)
    inputs = TrainInputs.from_dict(spec["inputs"])
    try:
        result = train_model(
            inputs.images,
            spec["out"],
            TrainSettings.model_validate(spec["settings"]),
            ModelEntry.model_validate(spec["entry"]),
            **inputs.keywords(),
            models=spec.get("models") or None,
        )
    except (ValueError, RuntimeError, OSError) as error:
        print(f"embedpipe train: error: {error}", file=sys.stderr)
        return 1
    if os.environ.get("RANK", "0") == "0":
        with open(spec["result"], "w", encoding="utf-8") as handle:
            json.dump(asdict(result), handle)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1]))
