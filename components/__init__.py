"""KFP v2 lightweight components: typed, thin wrappers over the library's stages.

Each component takes its stage's settings as one ``dict`` (the config section, as
compiled) and the run's ``overrides``, and validates their merge with the stage's
settings model first. ``build_components`` turns the functions into components for
the image each needs; the pipelines take the images from configuration, so no
component names one.
"""

from __future__ import annotations

import functools
from types import MappingProxyType, SimpleNamespace

from kfp import dsl

from embedpipe.components.catalog import catalog
from embedpipe.components.check import check_settings
from embedpipe.components.dedup import dedup
from embedpipe.components.embed import embed, merge_embeddings
from embedpipe.components.evaluate import evaluate
from embedpipe.components.ingest import ingest
from embedpipe.components.mine import combine, mine, mine_negatives, partition, to_hf
from embedpipe.components.publish import publish
from embedpipe.components.split import split
from embedpipe.components.taxonomy import taxonomy
from embedpipe.components.train import train, train_job
from embedpipe.components.tune import tune, tune_katib

DATA, GPU = "data", "gpu"
# Component name -> (function, image). Adding a stage is one entry here.
COMPONENTS = MappingProxyType(
    {
        "check_settings": (check_settings, DATA),
        "ingest": (ingest, DATA),
        "catalog": (catalog, DATA),
        "split": (split, DATA),
        "taxonomy": (taxonomy, DATA),
        "dedup": (dedup, DATA),
        "embed": (embed, GPU),
        "merge_embeddings": (merge_embeddings, DATA),
        "partition": (partition, DATA),
        "mine": (mine, DATA),  # CPU faiss in the data image,
        "mine_gpu": (mine, GPU),  # or faiss-gpu in the GPU image when GPUs are asked for
        "combine": (combine, DATA),
        # after a search of [mine] filters: every category re-mined with the best ones
        "mine_negatives": (mine_negatives, DATA),
        "mine_negatives_gpu": (mine_negatives, GPU),
        "to_hf": (to_hf, DATA),
        "train": (train, GPU),
        "train_job": (train_job, DATA),  # launches a multi-node TrainJob and follows it
        "tune": (tune, GPU),  # Optuna: trials train in this pod
        "tune_katib": (tune_katib, DATA),  # launches a Katib Experiment and follows it
        "evaluate": (evaluate, GPU),
        "publish": (publish, GPU),
    }
)


def build_components(data_image: str, gpu_image: str) -> SimpleNamespace:
    """Every component, on the data image or the GPU image, by name (``parts.ingest``).

    The images already hold embedpipe and kfp: nothing is pip-installed at start-up.
    """
    images = {DATA: data_image, GPU: gpu_image}
    make = functools.partial(dsl.component, install_kfp_package=False)
    return SimpleNamespace(
        **{
            name: make(function, base_image=images[image])
            for name, (function, image) in COMPONENTS.items()
        }
    )
