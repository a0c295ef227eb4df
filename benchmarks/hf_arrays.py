"""Ingest of a Hugging Face dataset whose images are pixel arrays, against a user's loop.

Generates an AstroCLIP-shaped ``save_to_disk`` folder (``image``: Array3D
float32 144x144x3 galaxy-like flux with noise; ``spectrum``: Array2D float32
(7781, 1); ``redshift``), then times, each in a fresh process so peak memory is
its own:

- baseline: what a user writes without this feature: ``datasets`` rows as numpy,
  each image scaled by the same percentile rule and encoded as PNG with PIL,
  spectra flattened, one Parquet file written at the end (no validation, no
  hash, no shards, no rejected rows);
- embedpipe ingest of the folder (the PNG decoded once more to validate it,
  sha256 ids, signal checks, shards and manifest).

CPU only (``--device`` is accepted for the harness' uniformity and must be cpu).

Usage: python benchmarks/hf_arrays.py [--rows 512] [--workdir .bench/hf_arrays]
"""

from __future__ import annotations

import argparse
import os
import shutil
from pathlib import Path

import harness
import numpy as np

SIDE = 144
BINS = 7781


def generate(folder: Path, rows: int) -> None:
    import datasets as hf

    if (folder / ".complete").exists():
        return
    shutil.rmtree(folder, ignore_errors=True)
    rng = np.random.default_rng(0)
    y, x = np.mgrid[:SIDE, :SIDE]

    def rows_of(start: int, count: int) -> dict:
        images, spectra = [], []
        for _ in range(count):
            cy, cx, width = rng.uniform(50, 94), rng.uniform(50, 94), rng.uniform(20, 120)
            blob = 40.0 * np.exp(-((y - cy) ** 2 + (x - cx) ** 2) / width)
            colour = rng.uniform(0.3, 1.5, size=3)
            noise = rng.normal(size=(SIDE, SIDE, 3))
            images.append((blob[..., None] * colour + noise).astype(np.float32))
            spectra.append(rng.normal(size=(BINS, 1)).astype(np.float32))
        return {"image": images, "spectrum": spectra, "redshift": rng.uniform(0, 1, count)}

    features = hf.Features(
        {
            "image": hf.Array3D(shape=(SIDE, SIDE, 3), dtype="float32"),
            "spectrum": hf.Array2D(shape=(BINS, 1), dtype="float32"),
            "redshift": hf.Value("float32"),
        }
    )
    parts = [
        hf.Dataset.from_dict(rows_of(start, min(128, rows - start)), features=features)
        for start in range(0, rows, 128)
    ]
    hf.concatenate_datasets(parts).save_to_disk(str(folder / "data"))
    (folder / ".complete").write_text(str(rows))


def baseline(source: Path, out: Path) -> int:
    import io

    import datasets as hf
    import pyarrow as pa
    import pyarrow.parquet as pq
    from PIL import Image

    dataset = hf.load_from_disk(str(source)).with_format("numpy")
    images, spectra, redshifts = [], [], []
    for batch in dataset.iter(batch_size=64):
        for image, spectrum, redshift in zip(
            batch["image"], batch["spectrum"], batch["redshift"], strict=True
        ):
            low, high = np.percentile(image, (1, 99))
            scaled = np.clip((image.astype(np.float64) - low) / (high - low), 0, 1) * 255
            buffer = io.BytesIO()
            Image.fromarray(np.rint(scaled).astype(np.uint8), "RGB").save(buffer, "PNG")
            images.append(buffer.getvalue())
            spectra.append(spectrum.reshape(-1))
            redshifts.append(float(redshift))
    out.mkdir(parents=True, exist_ok=True)
    table = pa.table(
        {
            "image": images,
            "spectrum": pa.array(spectra, pa.list_(pa.float32())),
            "redshift": redshifts,
        }
    )
    pq.write_table(table, out / "rows.parquet")
    return len(images)


def embedpipe_ingest(source: Path, out: Path) -> int:
    from embedpipe.config import IngestSettings
    from embedpipe.data.ingest import ingest_images

    return ingest_images([str(source)], str(out), IngestSettings()).images


def child(mode: str, source: str, out: str) -> None:
    run = baseline if mode == "baseline" else embedpipe_ingest
    harness.report(lambda: run(Path(source), Path(out)))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rows", type=int, default=512)
    parser.add_argument("--device", default="cpu", choices=["cpu"])
    parser.add_argument("--workdir", default=".bench/hf_arrays")
    parser.add_argument("--measure", nargs=3, metavar=("MODE", "SOURCE", "OUT"))
    args = parser.parse_args()
    if args.measure:
        child(*args.measure)
        return

    folder = Path(args.workdir) / f"astroclip-like-{args.rows}"
    print(f"cpus: {os.cpu_count()}; generating {args.rows} rows under {folder} ...", flush=True)
    generate(folder, args.rows)
    source = folder / "data"
    runs = {"baseline (numpy + PIL loop, one file)": "baseline", "embedpipe ingest": "embedpipe"}
    harness.compare(__file__, runs, source, Path(args.workdir), "rows")


if __name__ == "__main__":
    main()
