"""Hard-negative mining: `embedpipe mine` against raw faiss, numpy and sklearn BallTree.

100,000 normalised 512-d vectors in 10 categories (100 concepts of 100 images
each), top_k = 10 negatives from other concepts of the same category:

- embedpipe mine: the command itself, in this process (``main(["mine", ...])``):
  Parquet in (metadata and embeddings datasets), every category mined, Parquet
  out;
- faiss raw (the baseline): the same exact search (IndexFlatIP, same k) on
  in-memory arrays, nothing else; embedpipe's ratio to it is its overhead;
- numpy brute force: one matrix product per category, then top-k;
- sklearn BallTree (the building-embedding seed's approach), built and queried
  per category. In 512 dimensions it is so slow that it runs on
  ``--balltree-categories`` categories and is scaled to all ten (printed so).

- embedpipe mine with the false-negative filters (``relative_margin = 0.05``, so
  the candidates ranked up to 10 x top_k are searched and filtered), and unfiltered
  at that same depth (``rank_max = 10 x top_k``): the first against the second is
  what the filters cost, the second against the default what the deeper search
  costs (``--no-filtered`` skips both).

embedpipe and faiss raw run ``--repeats`` times, interleaved, and the best run
of each counts (the first embedpipe run also pays its imports). ``--device
cuda`` runs both on faiss GPU when the installed faiss has it and sees a GPU,
and says so when it does not; ``--vectors 1000000`` then gives the GPU figures.

Usage: python benchmarks/mine.py [--vectors 100000] [--categories 10] [--top-k 10]
    [--device cpu|cuda] [--repeats 3] [--balltree-categories 1] [--no-brute-force]
    [--no-filtered]
"""

import argparse
import contextlib
import io
import json
import shutil
import time
from pathlib import Path

import faiss
import numpy as np
import pyarrow as pa

from embedpipe.cli import main as embedpipe_main
from embedpipe.core import datasets


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


def faiss_gpu_available() -> bool:
    return hasattr(faiss, "StandardGpuResources") and faiss.get_num_gpus() > 0


def faiss_raw(vectors, k, gpu: bool):
    index = faiss.IndexFlatIP(vectors.shape[1])
    if gpu:
        index = faiss.index_cpu_to_all_gpus(index)
    index.add(vectors)
    return index.search(vectors, k)


def embedpipe_mine(work: Path, gpu: bool, flags: tuple[str, ...] = ()) -> list[dict]:
    """`embedpipe mine` on the generated datasets; returns its per-category results."""
    out = work / "out"
    shutil.rmtree(out, ignore_errors=True)
    argv = ["--log-level", "WARNING", "mine", str(work / "meta"), str(work / "emb"), *flags]
    printed = io.StringIO()
    with contextlib.redirect_stdout(printed):
        code = embedpipe_main([*argv, "--out", str(out), "--gpu" if gpu else "--no-gpu"])
    if code:
        raise SystemExit(f"embedpipe mine failed ({code})")
    return json.loads(printed.getvalue())


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
    parser.add_argument("--device", choices=("cpu", "cuda"), default="cpu")
    parser.add_argument("--repeats", type=int, default=3, help="interleaved runs; best counts")
    parser.add_argument("--balltree-categories", type=int, default=1, help="0: skip BallTree")
    parser.add_argument("--no-brute-force", action="store_true", help="skip numpy brute force")
    parser.add_argument(
        "--no-filtered", action="store_true", help="skip the filtered and the deeper runs"
    )
    parser.add_argument("--workdir", default=".bench/mine")
    args = parser.parse_args()

    gpu = args.device == "cuda" and faiss_gpu_available()
    if args.device == "cuda" and not gpu:
        print(
            "--device cuda: this faiss has no GPU support or sees no GPU "
            f"(faiss {faiss.__version__}); both sides run on the CPU"
        )
    work = Path(args.workdir)
    shutil.rmtree(work, ignore_errors=True)
    vectors, categories, concepts = generate(work, args.vectors, args.categories, args.dim)
    names = sorted(set(categories))
    largest = max(np.unique(concepts[categories == names[0]], return_counts=True)[1])
    k = args.top_k + int(largest) + 1  # the depth embedpipe searches
    print(
        f"{len(vectors)} vectors x {args.dim}, {len(names)} categories, top_k {args.top_k}, "
        f"search depth {k}, faiss {'GPU' if gpu else 'CPU'}, "
        f"faiss threads {faiss.omp_get_max_threads()}"
    )

    def per_category(function, subset):
        started = time.perf_counter()
        for name in subset:
            mask = categories == name
            function(np.ascontiguousarray(vectors[mask]), concepts[mask])
        return time.perf_counter() - started

    last_rank = str(10 * args.top_k)
    variants = (
        {}
        if args.no_filtered
        else {
            f"embedpipe mine, unfiltered, ranks to {last_rank}": ("--rank-max", last_rank),
            "embedpipe mine, relative_margin 0.05 (same depth)": ("--relative-margin", "0.05"),
        }
    )
    variant_runs = {label: [] for label in variants}
    variant_cpu = {label: [] for label in variants}
    variant_results = {}
    ours_runs, raw_runs, mining_runs, ours_cpu, raw_cpu = [], [], [], [], []
    for _ in range(args.repeats):
        for label, flags in variants.items():
            started, cpu = time.perf_counter(), time.process_time()
            variant_results[label] = embedpipe_mine(work, gpu, (*flags, "--top-k", str(args.top_k)))
            variant_runs[label].append(time.perf_counter() - started)
            variant_cpu[label].append(time.process_time() - cpu)
        started, cpu = time.perf_counter(), time.process_time()
        results = embedpipe_mine(work, gpu, ("--top-k", str(args.top_k)))
        ours_runs.append(time.perf_counter() - started)
        ours_cpu.append(time.process_time() - cpu)
        mining_runs.append(sum(r["seconds"] for r in results))
        cpu = time.process_time()
        raw_runs.append(per_category(lambda v, c: faiss_raw(v, k, gpu), names))
        raw_cpu.append(time.process_time() - cpu)
    ours, raw = min(ours_runs), min(raw_runs)
    index = results[0]["index"]

    rows = [
        (f"embedpipe mine (CLI, Parquet in and out, {index} index)", ours),
        ("faiss raw search on the same arrays (same k): the baseline", raw),
    ]
    rows += [(label, min(runs)) for label, runs in variant_runs.items()]
    if not args.no_brute_force:
        brute = per_category(lambda v, c: numpy_brute(v, c, args.top_k), names)
        rows.append(("numpy brute force (matrix product + top-k)", brute))
    if args.balltree_categories:
        measured = names[: args.balltree_categories]
        tree = per_category(lambda v, c: balltree(v, c, args.top_k, k), measured)
        label = f"sklearn BallTree ({len(measured)} of {len(names)} categories, scaled)"
        rows.append((label, tree * len(names) / len(measured)))

    print(f"\n{'method':62s} {'seconds':>9s} {'x faiss raw':>11s}")
    for label, seconds in rows:
        print(f"{label:62s} {seconds:9.2f} {seconds / raw:11.2f}")
    print(
        f"\nbest of {args.repeats} interleaved runs; embedpipe "
        f"{', '.join(f'{s:.2f}' for s in ours_runs)} s (categories mined in "
        f"{', '.join(f'{s:.2f}' for s in mining_runs)} s, the rest reading the inputs), "
        f"faiss raw {', '.join(f'{s:.2f}' for s in raw_runs)} s"
    )
    # CPU seconds (every thread) move less than wall time on a machine others share
    print(
        f"CPU seconds, best run: embedpipe {min(ours_cpu):.2f}, faiss raw {min(raw_cpu):.2f} "
        f"({min(ours_cpu) / min(raw_cpu):.2f}x)"
    )
    print(f"embedpipe mine overhead over raw faiss (wall): {ours / raw:.2f}x")
    if variants:
        deeper, filtered = (min(runs) for runs in variant_runs.values())
        deeper_cpu, filtered_cpu = (min(runs) for runs in variant_cpu.values())
        counts = variant_results[list(variants)[1]]
        dropped = sum(r["dropped_relative_margin"] for r in counts)
        window = sum(r["window"] for r in counts)
        print(
            f"filters: relative_margin 0.05 dropped {dropped} of {window} candidates in the "
            f"rank window; filtered / unfiltered at the same depth (wall): "
            f"{filtered / deeper:.2f}x (CPU seconds {filtered_cpu:.2f} / {deeper_cpu:.2f} = "
            f"{filtered_cpu / deeper_cpu:.2f}x); depth {last_rank} ranks / default depth: "
            f"{deeper / ours:.2f}x (CPU {deeper_cpu / min(ours_cpu):.2f}x)"
        )


if __name__ == "__main__":
    main()
