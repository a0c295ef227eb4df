"""Duplicate finding: embedpipe dedup against imagededup's PHash on the same 20,000 images.

Generates rendered JPEGs with planted exact and near duplicates, ingests them,
and measures in the same run:

- hashing: embedpipe's parallel draft-mode phash over the Parquet shards, against
  imagededup ``PHash.encode_images`` over the folder (its own worker processes);
- near-duplicate search: embedpipe's faiss multi-index hashing range search,
  against imagededup ``find_duplicates`` (its BK-tree and its Cython brute force)
  on imagededup's encodings, all at the same distance threshold.

Usage: python benchmarks/dedup.py [--images 20000] [--max-distance 6]
"""

import argparse
import collections
import logging
import time
from pathlib import Path

import harness
import numpy as np
from PIL import Image, ImageEnhance

from embedpipe.config import DedupSettings, IngestSettings
from embedpipe.core import datasets
from embedpipe.data.dedup import hash_images, near_pairs
from embedpipe.data.ingest import ingest_images


def plant_duplicates(folder: Path, count: int) -> None:
    """Copy and re-encode some images elsewhere in the folder (exact and near duplicates)."""
    marker = folder / ".planted"
    if marker.exists():
        return
    files = sorted(folder.rglob("*.jpg"))
    rng = np.random.default_rng(1)
    for k, index in enumerate(rng.choice(len(files), count, replace=False)):
        source = files[index]
        target = files[(index + 7919) % len(files)].parent / f"dup-{k:05d}.jpg"
        if k % 2:
            target.write_bytes(source.read_bytes())
        else:
            with Image.open(source) as image:
                brighter = ImageEnhance.Brightness(image.resize((230, 230))).enhance(1.05)
                brighter.save(target, "JPEG", quality=75)
    marker.write_text(str(count))


def timed(function, *args, **kwargs):
    started = time.perf_counter()
    value = function(*args, **kwargs)
    return value, time.perf_counter() - started


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--images", type=int, default=20_000)
    parser.add_argument("--max-distance", type=int, default=6)
    parser.add_argument("--workdir", default=".bench/dedup")
    args = parser.parse_args()
    logging.getLogger("imagededup").setLevel(logging.ERROR)

    work = Path(args.workdir)
    folder = work / f"jpegs-{args.images}"
    harness.generate(folder, args.images, 256)
    plant_duplicates(folder, args.images // 100)
    images_uri = str(work / f"images-{args.images}")
    if not Path(datasets.side_path(images_uri, datasets.MANIFEST_NAME)).exists():
        ingest_images([str(folder)], images_uri, IngestSettings())
    files_per_id = collections.Counter(
        datasets.read_table(images_uri, columns=["image_id"]).column(0).to_pylist()
    )
    ids = list(files_per_id)
    config = DedupSettings(max_distance=args.max_distance)

    (codes, _), ours_hash = timed(
        hash_images, images_uri, {i: k for k, i in enumerate(ids)}, config
    )
    (first, second), ours_search = timed(near_pairs, codes, args.max_distance)
    # File pairs, as imagededup counts them: near pairs of contents, and identical files.
    counts = np.array([files_per_id[i] for i in ids])
    our_pairs = int((counts[first] * counts[second]).sum() + (counts * (counts - 1) // 2).sum())

    from imagededup.methods import PHash

    phash = PHash(verbose=False)
    encodings, theirs_hash = timed(phash.encode_images, image_dir=str(folder), recursive=True)
    found, theirs_bktree = timed(
        phash.find_duplicates,
        encoding_map=encodings,
        max_distance_threshold=args.max_distance,
        search_method="bktree",
    )
    _, theirs_brute = timed(
        phash.find_duplicates,
        encoding_map=encodings,
        max_distance_threshold=args.max_distance,
        search_method="brute_force_cython",
    )
    their_pairs = sum(len(v) for v in found.values()) // 2

    distinct = len(ids)
    print(
        f"{distinct} distinct images ({len(encodings)} files), threshold {args.max_distance} bits"
    )
    print(f"\n{'step':58s} {'seconds':>8s} {'x imagededup':>12s}")
    print(f"{'hashing: imagededup PHash.encode_images (folder)':58s} {theirs_hash:8.2f}")
    print(
        f"{'hashing: embedpipe (Parquet, draft decode, processes)':58s} {ours_hash:8.2f} "
        f"{theirs_hash / ours_hash:12.1f}"
    )
    print(f"{'search: imagededup find_duplicates, BK-tree':58s} {theirs_bktree:8.2f}")
    print(f"{'search: imagededup find_duplicates, Cython brute force':58s} {theirs_brute:8.2f}")
    print(
        f"{'search: embedpipe faiss multi-index hashing':58s} {ours_search:8.3f} "
        f"{theirs_bktree / ours_search:12.1f} (vs BK-tree), "
        f"{theirs_brute / ours_search:.1f} (vs brute force)"
    )
    print(f"\nfile pairs found: embedpipe {our_pairs}, imagededup {their_pairs}")


if __name__ == "__main__":
    main()
