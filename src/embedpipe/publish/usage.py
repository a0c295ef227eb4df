"""The one line of Python that loads a published model and embeds a picture, as a finished
run prints it: pasted into Python, it prints the picture's embedding."""

from __future__ import annotations

import os

from embedpipe.core import datasets, storage

OPEN_CLIP_CONFIG = "open_clip_config.json"
PLACEHOLDER_IMAGE = "IMAGE.jpg"


def load_line(published: str, image: str = PLACEHOLDER_IMAGE) -> str:
    """Load the model published at ``published`` and print the embedding of ``image``."""
    if storage.exists(storage.join(published, OPEN_CLIP_CONFIG)):
        return (
            "import open_clip; from PIL import Image; "
            "model, _, preprocess = open_clip.create_model_and_transforms("
            f'"local-dir:{published}"); '
            f'print(model.eval().encode_image(preprocess(Image.open("{image}"))[None], '
            "normalize=True))"
        )
    # a head: one transformers model with the backbone's image tower and preprocessing
    return (
        "from PIL import Image; from transformers import AutoModel; "
        f'model = AutoModel.from_pretrained("{published}", trust_remote_code=True); '
        f'print(model.embed(Image.open("{image}")))'
    )


def example_image(images_uri: str) -> str:
    """A picture file the images dataset was ingested from (still there), else a
    placeholder the reader replaces."""
    try:
        table = datasets.read_table(images_uri, columns=["source"])
    except (datasets.DatasetError, storage.StorageError, KeyError, ValueError, OSError):
        return PLACEHOLDER_IMAGE
    for source in table.column("source").to_pylist()[:100]:
        if isinstance(source, str) and os.path.isfile(source):
            return source
    return PLACEHOLDER_IMAGE
