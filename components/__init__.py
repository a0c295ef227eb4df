"""KFP v2 lightweight components: typed, thin wrappers over the library's stages.

The component functions live in one module per stage; ``build_components``
turns them into components for one base image, which the pipelines take from
configuration, so no component hard-codes an image.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass

from kfp import dsl

from embedpipe.components.catalog import catalog
from embedpipe.components.dedup import dedup
from embedpipe.components.embed import embed
from embedpipe.components.ingest import ingest
from embedpipe.components.mine import combine, mine, partition, to_hf
from embedpipe.components.split import split
from embedpipe.components.taxonomy import taxonomy


@dataclass(frozen=True)
class Components:
    ingest: dsl.base_component.BaseComponent
    catalog: dsl.base_component.BaseComponent
    split: dsl.base_component.BaseComponent
    taxonomy: dsl.base_component.BaseComponent
    dedup: dsl.base_component.BaseComponent
    embed: dsl.base_component.BaseComponent
    partition: dsl.base_component.BaseComponent
    mine: dsl.base_component.BaseComponent
    mine_gpu: dsl.base_component.BaseComponent
    combine: dsl.base_component.BaseComponent
    to_hf: dsl.base_component.BaseComponent


def build_components(data_image: str, gpu_image: str) -> Components:
    """Data stages on the slim data image, model stages on the GPU image.

    The images already hold embedpipe and kfp: nothing is pip-installed at start-up.
    """
    data = functools.partial(dsl.component, base_image=data_image, install_kfp_package=False)
    gpu = functools.partial(dsl.component, base_image=gpu_image, install_kfp_package=False)
    return Components(
        ingest=data(ingest),
        catalog=data(catalog),
        split=data(split),
        taxonomy=data(taxonomy),
        dedup=data(dedup),
        embed=gpu(embed),
        partition=data(partition),
        mine=data(mine),  # CPU faiss in the data image,
        mine_gpu=gpu(mine),  # or faiss-gpu in the GPU image when GPUs are asked for
        combine=data(combine),
        to_hf=data(to_hf),
    )
