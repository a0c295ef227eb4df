"""to-hf: hard negatives + image bytes -> a Hugging Face ``datasets`` Dataset on disk.

Each row holds the query image, up to ``max_positives`` positive images and
its negative images (bytes, as ``datasets.Image`` features), with ids, scores
and bands, ready for training; ``datasets.load_from_disk`` reloads it. The
folder is written locally first and published whole: renamed into place, or
uploaded to S3 with ``state.json`` last.
"""

import logging
import os
import shutil
import tempfile

import datasets as hf

from embedpipe.config import ToHfSettings
from embedpipe.core import datasets, storage
from embedpipe.core.schemas import IMAGES_KIND, NEGATIVES_KIND
from embedpipe.core.seeding import rng_for

log = logging.getLogger(__name__)

FEATURES = hf.Features(
    {
        "query_id": hf.Value("string"),
        "category": hf.Value("string"),
        "concept": hf.Value("string"),
        "query_image": hf.Image(),
        "positive_ids": hf.Sequence(hf.Value("string")),
        "positive_images": hf.Sequence(hf.Image()),
        "negative_ids": hf.Sequence(hf.Value("string")),
        "negative_images": hf.Sequence(hf.Image()),
        "negative_scores": hf.Sequence(hf.Value("float32")),
        "band": hf.Sequence(hf.Value("string")),
    }
)
PUBLISHED_LAST = "state.json"


def export_to_hf(negatives_uri: str, images_uri: str, out_uri: str, config: ToHfSettings) -> int:
    """Write the Dataset at ``out_uri``; return its number of rows."""
    max_positives, seed = config.max_positives, config.seed
    storage.check_output_apart(out_uri, [negatives_uri, images_uri])
    datasets.verify_dataset(negatives_uri, NEGATIVES_KIND)
    datasets.verify_dataset(images_uri, IMAGES_KIND)
    rows = datasets.read_table(negatives_uri, NEGATIVES_KIND).to_pylist()
    for row in rows:  # a fixed, seeded choice of positives per query
        positives = sorted(row["positive_ids"])
        rng_for(seed, row["query_id"]).shuffle(positives)
        row["positive_ids"] = positives[:max_positives]
    wanted = {r["query_id"] for r in rows}
    wanted.update(i for r in rows for i in r["positive_ids"] + r["negative_ids"])
    pictures = datasets.image_bytes(images_uri, wanted)
    missing = wanted - pictures.keys()
    if missing:
        raise ValueError(
            f"{images_uri}: {len(missing)} image(s) referenced by the negatives are "
            f"not in the image dataset, e.g. {sorted(missing)[0]}"
        )

    def image(image_id: str) -> dict:
        return {"bytes": pictures[image_id], "path": None}

    def examples():
        for row in rows:
            yield {
                **{
                    k: row[k]
                    for k in (
                        "query_id",
                        "category",
                        "concept",
                        "positive_ids",
                        "negative_ids",
                        "negative_scores",
                        "band",
                    )
                },
                "query_image": image(row["query_id"]),
                "positive_images": [image(i) for i in row["positive_ids"]],
                "negative_images": [image(i) for i in row["negative_ids"]],
            }

    dataset = (
        hf.Dataset.from_generator(examples, features=FEATURES)
        if rows
        else hf.Dataset.from_dict({name: [] for name in FEATURES}, features=FEATURES)
    )
    out_uri = storage.normalize(out_uri)
    _save(dataset, out_uri)
    log.info("wrote a Hugging Face dataset of %d rows to %s", len(dataset), out_uri)
    return len(dataset)


def _save(dataset: hf.Dataset, out_uri: str) -> None:
    parent = tempfile.gettempdir() if storage.is_s3(out_uri) else os.path.dirname(out_uri)
    os.makedirs(parent, exist_ok=True)
    staging = tempfile.mkdtemp(prefix=".hf-", dir=parent)
    try:
        # An empty dataset must still get one shard, or load_from_disk cannot read it back.
        dataset.save_to_disk(staging, num_shards=1 if len(dataset) == 0 else None)
        if not storage.is_s3(out_uri):
            previous = f"{staging}.previous"
            if os.path.exists(out_uri):
                os.replace(out_uri, previous)
            os.replace(staging, out_uri)
            shutil.rmtree(previous, ignore_errors=True)
            return
        names = sorted(os.listdir(staging), key=lambda name: name == PUBLISHED_LAST)
        for name in names:
            with storage.atomic_output(storage.join(out_uri, name)) as target:
                shutil.copyfile(os.path.join(staging, name), target)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
