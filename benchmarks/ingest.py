"""Ingest throughput and peak memory: `embedpipe ingest` against a plain Python loop.

Generates N rendered JPEGs laid out <category>/<concept>/<image> (and a tar of
them), then times, each in a fresh process so peak memory is its own:

- baseline: a loop that opens each file with PIL (decoding it, so corrupt
  files would be caught as ingest catches them), hashes it, appends the row
  to a list and builds one pyarrow table written to Parquet at the end;
- embedpipe ingest from the folder, and from the tar.

Usage: python benchmarks/ingest.py [--images 10000] [--small 2000] [--workdir .bench/ingest]
"""

from __future__ import annotations

import argparse
import hashlib
import os
import shutil
import tarfile
from pathlib import Path

import harness
from harness import generate


def make_tar(root: Path, archive: Path) -> None:
    if archive.exists():
        return
    partial = archive.with_suffix(".partial")
    with tarfile.open(partial, "w") as tar:
        for path in sorted(root.rglob("*.jpg")):
            tar.add(path, arcname=path.relative_to(root).as_posix())
    partial.rename(archive)


def baseline(source: Path, out: Path) -> int:
    import pyarrow as pa
    import pyarrow.parquet as pq
    from PIL import Image

    rows = []
    for path in sorted(source.rglob("*.jpg")):
        data = path.read_bytes()
        with Image.open(path) as image:
            image.load()
            width, height = image.size
        category, concept = path.parent.parent.name, path.parent.name
        rows.append(
            {
                "image_id": hashlib.sha256(data).hexdigest(),
                "image": data,
                "source": str(path),
                "category": category,
                "concept": concept,
                "width": width,
                "height": height,
            }
        )
    pq.write_table(pa.Table.from_pylist(rows), out)
    return len(rows)


def embedpipe_ingest(source: Path, out: Path) -> int:
    from embedpipe.config import IngestSettings
    from embedpipe.data.ingest import ingest_images

    return ingest_images([str(source)], str(out), IngestSettings()).images


def measure(mode: str, source: Path, out: Path) -> dict:
    shutil.rmtree(out, ignore_errors=True)
    return harness.measure(__file__, mode, source, out)


def child(mode: str, source: str, out: str) -> None:
    run = baseline if mode == "baseline" else embedpipe_ingest
    harness.report(lambda: run(Path(source), Path(out)))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--images", type=int, default=10_000)
    parser.add_argument("--small", type=int, default=2_000)
    parser.add_argument("--size", type=int, default=256, help="image side in pixels")
    parser.add_argument("--workdir", default=".bench/ingest")
    parser.add_argument("--measure", nargs=3, metavar=("MODE", "SOURCE", "OUT"))
    args = parser.parse_args()
    if args.measure:
        child(*args.measure)
        return

    work = Path(args.workdir)
    print(
        f"cpus: {os.cpu_count()}; generating {args.images} and {args.small} JPEGs "
        f"({args.size}px) under {work} ...",
        flush=True,
    )
    big, small = work / f"images-{args.images}", work / f"images-{args.small}"
    generate(big, args.images, args.size)
    generate(small, args.small, args.size)
    make_tar(big, work / f"images-{args.images}.tar")

    results = {
        "baseline (PIL loop -> pyarrow table), folder": measure("baseline", big, work / "out-b"),
        "embedpipe ingest, folder": measure("embedpipe", big, work / "out-d"),
        "embedpipe ingest, tar": measure(
            "embedpipe", work / f"images-{args.images}.tar", work / "out-t"
        ),
    }
    base_rate = None
    print(f"\n{'run':48s} {'images':>7s} {'seconds':>8s} {'images/s':>9s} {'x baseline':>10s}")
    for name, figures in results.items():
        rate = figures["items"] / figures["seconds"]
        base_rate = base_rate or rate
        print(
            f"{name:48s} {figures['items']:7d} {figures['seconds']:8.2f} {rate:9.0f} "
            f"{rate / base_rate:10.2f}"
        )

    print("\npeak memory of the ingesting process (MiB):")
    print(f"{'images':>8s} {'embedpipe':>10s} {'baseline':>10s}")
    for source in (small, big):
        count = int((source / ".complete").read_text())
        ours = measure("embedpipe", source, work / "out-m")["peak_mb"]
        theirs = measure("baseline", source, work / "out-mb")["peak_mb"]
        print(f"{count:8d} {ours:10.0f} {theirs:10.0f}")


if __name__ == "__main__":
    main()
