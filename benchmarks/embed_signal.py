"""Signal embedding throughput: `embedpipe embed-signal` against a bare torch forward of
the same encoder on the same tensors.

Writes an images dataset of ``--signals`` rows whose ``signal`` column holds random
spectra (``--length`` values each, or lengths drawn from [length/2, length] with
``--variable``), then measures on this machine, with embed's defaults for the device
(batch size, precision):

- bare forward: the encoder alone on the padded batches embed-signal makes, already on
  the device, in the same precision, normalised;
- embedpipe embed-signal: Parquet shards in, Parquet embeddings out (reading, checking
  and padding the signals, the forward, writing the shards).

The bare forward runs before and after embed-signal (shared cores change speed while
it runs); it prints signals/s for each and the ratio embedpipe / their mean. It runs unchanged
with ``--device cuda``.

Usage: python benchmarks/embed_signal.py [--signals 2000] [--length 1000]
       [--model signal_transformer] [--device cpu] [--variable]
"""

import argparse
import hashlib
import shutil
import time
from pathlib import Path

import numpy as np
import pyarrow as pa

from embedpipe.config import EmbedSettings
from embedpipe.core import datasets
from embedpipe.core.schemas import IMAGES_KIND, IMAGES_SCHEMA
from embedpipe.embed.openmp import passive_wait
from embedpipe.models.registry import get_entry

passive_wait()  # before torch loads, as `embedpipe embed-signal` does

from embedpipe.embed import runtime, signals  # noqa: E402
from embedpipe.models.loading import load_model  # noqa: E402
from embedpipe.models.precision import resolve_name  # noqa: E402


def synchronize(device) -> None:
    import torch

    if device.type == "cuda":
        torch.cuda.synchronize(device)


def write_signals(uri: str, count: int, length: int, variable: bool) -> None:
    """An images dataset (image bytes left empty: only ids and signals are read) with a
    ``signal`` column, 1,000 rows per shard."""
    rng = np.random.default_rng(0)
    lengths = rng.integers(length // 2, length + 1, count) if variable else np.full(count, length)
    offsets = np.concatenate([[0], np.cumsum(lengths)]).astype(np.int32)
    values = rng.normal(size=int(offsets[-1])).astype(np.float32)
    ids = [hashlib.sha256(str(i).encode()).hexdigest() for i in range(count)]
    columns = {
        "image_id": ids,
        "image": [b""] * count,
        "source": [f"signal/{i}" for i in range(count)],
        "category": ["c"] * count,
        "concept": ["c"] * count,
        "split": [None] * count,
        "width": [1] * count,
        "height": [1] * count,
    }
    table = pa.table(columns, schema=IMAGES_SCHEMA)
    table = table.append_column("signal", pa.ListArray.from_arrays(offsets, values))
    datasets.write_table(uri, table, IMAGES_KIND, rows_per_shard=1_000)


def bare_forward(images_uri: str, entry, config: EmbedSettings) -> float:
    """signals/s of the encoder alone on embed-signal's batches, already on the device."""
    device = runtime.resolve_device(config.device)
    model = load_model(entry, "random", str(device))
    inference = signals.signal_inference(model, config, device)
    table = datasets.read_table(images_uri, columns=["signal"])
    rows = signals.SignalRows.from_arrow(table.column("signal"))
    everything = list(range(len(rows.lengths)))
    batches = [
        tuple(
            part.to(device)
            for part in signals.padded_batch(rows, everything[first : first + inference.batch_size])
        )
        for first in range(0, len(everything), inference.batch_size)
    ]
    inference.encode(*batches[0], config.normalize, config.dim)  # warm-up
    synchronize(device)
    started = time.perf_counter()
    for values, lengths in batches:
        inference.encode(values, lengths, config.normalize, config.dim)
    synchronize(device)
    return len(everything) / (time.perf_counter() - started)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--signals", type=int, default=2_000)
    parser.add_argument("--length", type=int, default=1_000)
    parser.add_argument("--variable", action="store_true", help="lengths in [length/2, length]")
    parser.add_argument("--model", default="signal_transformer", help="a signal registry entry")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--batch-size", type=int, default=0, help="0: embed's default")
    parser.add_argument("--precision", default="auto")
    parser.add_argument("--workdir", default=".bench/embed_signal")
    args = parser.parse_args()

    work = Path(args.workdir)
    shape = f"{args.signals}x{args.length}{'v' if args.variable else ''}"
    images_uri = str(work / f"signals-{shape}")
    if not Path(datasets.side_path(images_uri, datasets.MANIFEST_NAME)).exists():
        write_signals(images_uri, args.signals, args.length, args.variable)
    entry = get_entry(args.model)
    config = EmbedSettings(
        weights="random", device=args.device, batch_size=args.batch_size, precision=args.precision
    )
    import torch

    device = runtime.resolve_device(config.device)
    print(
        f"model {entry.name} ({entry.architecture}, {entry.arch}), device {device}, "
        f"{torch.get_num_threads()} torch threads, "
        f"batch {runtime.resolve_batch_size(config, entry, device)}, "
        f"precision {resolve_name(config.precision, device)}, signals {shape}"
    )
    bare = bare_forward(images_uri, entry, config)
    out = work / "embeddings"
    shutil.rmtree(out, ignore_errors=True)
    started = time.perf_counter()
    result = signals.embed_signals(images_uri, str(out), config, "signal", entry)
    ours = result.embedded / (time.perf_counter() - started)
    # again after: on shared cores the load changes while it runs; the mean is the baseline
    bare_after = bare_forward(images_uri, entry, config)
    baseline = (bare + bare_after) / 2

    print(f"\n{'run':60s} {'signals/s':>10s}")
    print(f"{'bare torch forward, batches on the device (before)':60s} {bare:10.1f}")
    print(f"{'embedpipe embed-signal (Parquet in, Parquet out)':60s} {ours:10.1f}")
    print(f"{'bare torch forward, batches on the device (after)':60s} {bare_after:10.1f}")
    print(f"ratio embedpipe / bare forward (mean of before and after): {ours / baseline:.2f}")


if __name__ == "__main__":
    main()
