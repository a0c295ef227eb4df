"""One training process under torchrun, started by ``train_in_processes`` with a JSON spec:
``{"images", "out", "settings", "entry", "splits", "negatives", "embeddings", "captions"}``."""

import json
import sys

from embedpipe.config import TrainSettings
from embedpipe.models.registry import ModelEntry
from embedpipe.train.stage import train_model


def main(spec_path: str) -> None:
    with open(spec_path, encoding="utf-8") as handle:
        spec = json.load(handle)
    train_model(
        spec["images"],
        spec["out"],
        TrainSettings.model_validate(spec["settings"]),
        ModelEntry.model_validate(spec["entry"]),
        splits_uri=spec.get("splits"),
        negatives_uri=spec.get("negatives"),
        embeddings_uri=spec.get("embeddings"),
        captions_uri=spec.get("captions"),
    )


if __name__ == "__main__":
    main(sys.argv[1])
