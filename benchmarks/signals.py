"""Ingest with a signals table against ingest followed by a pandas merge of the same table.

Generates the signals demo (galaxy PNGs and a spectrum per image, keyed by
source), then times, each in a fresh process so peak memory is its own:

- baseline: `embedpipe ingest` without signals, then pandas reads the images
  dataset and the table, merges them on the source path and writes one
  Parquet file (what a user would do without the join);
- embedpipe ingest with ``--signals TABLE --signal-key source``, which checks
  every signal (length, finiteness) and writes the columns into the shards.

Both end with the same rows (the planted NaN spectrum aside, which only
embedpipe rejects). CPU only: no device is involved (``--device`` is accepted
for the harness' uniformity and must be cpu).

Usage: python benchmarks/signals.py [--objects 250] [--bins 1024] [--workdir .bench/signals]
"""

from __future__ import annotations

import argparse
import os
import shutil
from pathlib import Path

import harness


def baseline(source: Path, out: Path) -> int:
    import pandas as pd

    from embedpipe.config import IngestSettings
    from embedpipe.data.ingest import ingest_images

    ingest_images([str(source)], str(out / "images"), IngestSettings())
    images = pd.read_parquet(out / "images")
    table = pd.read_parquet(source / "signals.parquet")
    table["source"] = str(source) + "/" + table["source"]
    merged = images.merge(table, on="source", how="inner")
    merged.to_parquet(out / "merged.parquet")
    return len(merged)


def embedpipe_signals(source: Path, out: Path) -> int:
    from embedpipe.config import IngestSettings
    from embedpipe.data.ingest import ingest_images

    config = IngestSettings(signals=str(source / "signals.parquet"), signal_key="source")
    return ingest_images([str(source)], str(out), config).images


def child(mode: str, source: str, out: str) -> None:
    run = baseline if mode == "baseline" else embedpipe_signals
    harness.report(lambda: run(Path(source), Path(out)))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--objects", type=int, default=250, help="objects per galaxy type")
    parser.add_argument("--views", type=int, default=4)
    parser.add_argument("--bins", type=int, default=1024, help="spectrum length")
    parser.add_argument("--device", default="cpu", choices=["cpu"])
    parser.add_argument("--workdir", default=".bench/signals")
    parser.add_argument("--measure", nargs=3, metavar=("MODE", "SOURCE", "OUT"))
    args = parser.parse_args()
    if args.measure:
        child(*args.measure)
        return

    from embedpipe.data.demo_signals import SignalDemoSpec, generate_signal_demo

    spec = SignalDemoSpec(objects=args.objects, views=args.views, bins=args.bins)
    source = Path(args.workdir) / f"galaxies-{args.objects}-{args.views}-{args.bins}"
    print(f"cpus: {os.cpu_count()}; generating the signals demo under {source} ...", flush=True)
    if not (source / ".complete").exists():
        shutil.rmtree(source, ignore_errors=True)
        generate_signal_demo(str(source), spec)
        (source / ".complete").write_text("")
    runs = {
        "baseline (ingest, then pandas merge)": "baseline",
        "embedpipe ingest --signals": "embedpipe",
    }
    harness.compare(__file__, runs, source, Path(args.workdir), "images")


if __name__ == "__main__":
    main()
