"""Hard-negative mining: `embedpipe mine` against sklearn BallTree, numpy and raw faiss.

100,000 normalised 512-d vectors in 10 categories (100 concepts of 100 images
each), top_k = 10 negatives from other concepts of the same category:

- embedpipe: the pipeline's work, Parquet in and Parquet out: one
  ``partition_by_category`` pass, then ``mine_category`` for every category;
- faiss raw: the same exact search (IndexFlatIP, same k) on in-memory arrays,
  nothing else: the ratio to it is embedpipe's overhead;
- numpy brute force: one matrix product per category, then top-k;
- sklearn BallTree (the building-embedding seed's approach), built and queried
  per category. In 512 dimensions it is so slow that it runs on
  ``--balltree-categories`` categories and is scaled to all ten (printed so).

With a GPU and faiss-gpu, ``--vectors 1000000`` gives the GPU figures.

Usage: python benchmarks/mine.py [--vectors 100000] [--categories 10] [--top-k 10]
"""

import argparse
import shutil
import time
from pathlib import Path

import faiss
import numpy as np
import pyarrow as pa

from embedpipe.config import MineSettings
from embedpipe.core import datasets
from embedpipe.mining.mine import mine_category
from embedpipe.mining.partition import partition_by_category


def generate(work: Path, vectors: int, categories: int, dim: int):
    rng = np.random.default_rng(0)
    per_category = vectors // categories
    concepts = max(2, per_category // 100)
    matrix = np.empty((vectors, dim), np.float32)
    meta = {"image_id": [], "category": [], "concept": [], "split": []}
    row = 0
    for c in range(categories):
        centre = rng.normal(size=dim)
        for k in range(concepts):
            count = per_category // concepts
            concept_centre = centre + rng.normal(scale=0.7, size=dim)
            matrix[row : row + count] = concept_centre + rng.normal(scale=1.0, size=(count, dim))
            for i in range(count):
                meta["image_id"].append(f"{c:02d}-{k:03d}-{i:04d}")
                meta["category"].append(f"category{c:02d}")
                meta["concept"].append(f"concept{k:03d}")
                meta["split"].append("train")
            row += count
    matrix = matrix[:row]
    faiss.normalize_L2(matrix)
    datasets.write_table(str(work / "meta"), pa.table(meta), "selection")
    embedding = pa.FixedSizeListArray.from_arrays(pa.array(matrix.reshape(-1)), dim)
    datasets.write_table(
        str(work / "emb"),
        pa.table({"image_id": meta["image_id"], "embedding": embedding}),
        "embeddings",
    )
    return matrix, np.array(meta["category"]), np.array(meta["concept"])


def faiss_raw(vectors, k):
    index = faiss.IndexFlatIP(vectors.shape[1])
    index.add(vectors)
    return index.search(vectors, k)


def numpy_brute(vectors, concepts, top_k):
    similarity = vectors @ vectors.T
    similarity[concepts[:, None] == concepts[None, :]] = -np.inf
    best = np.argpartition(-similarity, top_k, axis=1)[:, :top_k]
    order = np.take_along_axis(similarity, best, axis=1).argsort(axis=1)[:, ::-1]
    return np.take_along_axis(best, order, axis=1)


def balltree(vectors, concepts, top_k, k):
    from sklearn.neighbors import BallTree

    tree = BallTree(vectors)
    _, neighbours = tree.query(vectors, k=k)
    other = concepts[neighbours] != concepts[:, None]
    return [row[mask][:top_k] for row, mask in zip(neighbours, other, strict=True)]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--vectors", type=int, default=100_000)
    parser.add_argument("--categories", type=int, default=10)
    parser.add_argument("--dim", type=int, default=512)
    parser.add_argument("--top-k", type=int, default=10)
    parser.add_argument("--balltree-categories", type=int, default=1)
    parser.add_argument("--workdir", default=".bench/mine")
    args = parser.parse_args()

    work = Path(args.workdir)
    shutil.rmtree(work, ignore_errors=True)
    vectors, categories, concepts = generate(work, args.vectors, args.categories, args.dim)
    names = sorted(set(categories))
    largest = max(np.unique(concepts[categories == names[0]], return_counts=True)[1])
    k = args.top_k + int(largest) + 1  # the k embedpipe searches with
    print(
        f"{len(vectors)} vectors x {args.dim}, {len(names)} categories, top_k {args.top_k}, "
        f"faiss threads {faiss.omp_get_max_threads()}"
    )

    config = MineSettings(top_k=args.top_k)
    started = time.perf_counter()
    partitions = partition_by_category(
        str(work / "meta"), str(work / "emb"), str(work / "partitions")
    )
    for name in names:
        mine_category(partitions[name], str(work / "out" / name), config)
    ours = time.perf_counter() - started

    def per_category(function, subset):
        started = time.perf_counter()
        for name in subset:
            mask = categories == name
            function(vectors[mask], concepts[mask])
        return time.perf_counter() - started

    raw = per_category(lambda v, c: faiss_raw(v, k), names)
    brute = per_category(lambda v, c: numpy_brute(v, c, args.top_k), names)
    measured = names[: args.balltree_categories]
    tree = per_category(lambda v, c: balltree(v, c, args.top_k, k), measured)
    tree_all = tree * len(names) / len(measured)

    print(f"\n{'method':60s} {'seconds':>9s} {'embedpipe x':>11s}")
    print(f"{'embedpipe mine (all categories, Parquet in and out)':60s} {ours:9.2f}")
    print(f"{'faiss raw search on the same arrays (same k)':60s} {raw:9.2f} {raw / ours:11.2f}")
    print(f"{'numpy brute force (matrix product + top-k)':60s} {brute:9.2f} {brute / ours:11.1f}")
    label = f"sklearn BallTree ({len(measured)} of {len(names)} categories, scaled)"
    print(f"{label:60s} {tree_all:9.2f} {tree_all / ours:11.1f}")
    print(f"\nembedpipe overhead over raw faiss: {ours / raw:.2f}x")


if __name__ == "__main__":
    main()
