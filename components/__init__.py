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
from embedpipe.components.ingest import ingest
from embedpipe.components.split import split
from embedpipe.components.taxonomy import taxonomy


@dataclass(frozen=True)
class Components:
    ingest: dsl.base_component.BaseComponent
    catalog: dsl.base_component.BaseComponent
    split: dsl.base_component.BaseComponent
    taxonomy: dsl.base_component.BaseComponent


def build_components(data_image: str) -> Components:
    # The image already has embedpipe and kfp installed: no pip install at start-up.
    component = functools.partial(dsl.component, base_image=data_image, install_kfp_package=False)
    return Components(
        ingest=component(ingest),
        catalog=component(catalog),
        split=component(split),
        taxonomy=component(taxonomy),
    )
