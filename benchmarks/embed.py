"""Embedding throughput: `embedpipe embed` against the model's forward on pre-decoded tensors.

Generates 5,000 rendered JPEGs, ingests them, then measures on this machine:

- ceiling: the same model's forward pass over tensors decoded and preprocessed
  beforehand (no decoding, no I/O): the most any embedding tool could reach;
- embedpipe embed: Parquet shards in, Parquet embeddings out, decoding in
  DataLoader workers.

It prints images/s for both and the ratio. On a machine with a GPU, run it with
``--model clip_vitb16 --device cuda`` (bf16 autocast) to get the GPU figures,
including model FLOP utilisation against ``--peak-tflops``.

Usage: python benchmarks/embed.py [--images 5000] [--model NAME] [--device cpu]
"""

import argparse
import io
import shutil
import time
from pathlib import Path

import harness
from PIL import Image

from embedpipe.config import EmbedSettings, IngestSettings
from embedpipe.core import datasets
from embedpipe.data.ingest import ingest_images
from embedpipe.embed.images import autocast_dtype, embed_images, resolve_device
from embedpipe.models.loading import load_model
from embedpipe.models.registry import ModelEntry, get_entry

SMALL_MODEL = ModelEntry(
    name="vit_s32", library="open_clip", architecture="ViT-S-32-alt", embed_dim=256, image_size=224
)


def model_flops_per_image(model, size: int, device) -> float:
    """Forward FLOPs of one image, counted by torch's FLOP counter."""
    import torch
    from torch.utils.flop_counter import FlopCounterMode

    with FlopCounterMode(display=False) as counter, torch.inference_mode():
        model.encode_images(torch.zeros(1, 3, size, size, device=device))
    return counter.get_total_flops()


def ceiling(entry, images_uri: str, config: EmbedSettings) -> tuple[float, float]:
    import torch  # after embedpipe.embed.images, which sets the OpenMP wait policy first

    device = resolve_device(config.device)
    model = load_model(entry, "random", str(device))
    table = datasets.read_table(images_uri, "images", ["image"])
    pixels = torch.stack(
        [
            model.transform(Image.open(io.BytesIO(b)).convert("RGB"))
            for b in table.column(0).to_pylist()
        ]
    )
    dtype = autocast_dtype(config.precision, device)
    batches = pixels.split(config.batch_size)
    with (
        torch.inference_mode(),
        torch.autocast(device.type, dtype=dtype, enabled=dtype is not None),
    ):
        model.encode_images(batches[0].to(device))  # warm-up
        if device.type == "cuda":
            torch.cuda.synchronize()
        started = time.perf_counter()
        for batch in batches:
            model.encode_images(batch.to(device, non_blocking=True))
        if device.type == "cuda":
            torch.cuda.synchronize()
    seconds = time.perf_counter() - started
    return len(pixels) / seconds, model_flops_per_image(model, entry.image_size, device)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--images", type=int, default=5_000)
    parser.add_argument("--model", default="", help="registry name (default: ViT-S-32-alt)")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--num-workers", type=int, default=1)
    parser.add_argument(
        "--peak-tflops",
        type=float,
        default=0.0,
        help="the device's dense peak (e.g. 989 for H100 bf16) for MFU",
    )
    parser.add_argument("--workdir", default=".bench/embed")
    args = parser.parse_args()

    work = Path(args.workdir)
    folder = work / f"jpegs-{args.images}"
    harness.generate(folder, args.images, 256)
    images_uri = str(work / f"images-{args.images}")
    if not Path(datasets.side_path(images_uri, datasets.MANIFEST_NAME)).exists():
        ingest_images([str(folder)], images_uri, IngestSettings())
    entry = get_entry(args.model) if args.model else SMALL_MODEL
    config = EmbedSettings(
        weights="random",
        device=args.device,
        batch_size=args.batch_size,
        num_workers=args.num_workers,
    )
    import torch

    print(
        f"model {entry.name} ({entry.architecture}), device {args.device}, "
        f"{torch.get_num_threads()} torch threads, {args.num_workers} decoding worker(s)"
    )

    ceiling_rate, flops = ceiling(entry, images_uri, config)
    out = work / "embeddings"
    shutil.rmtree(out, ignore_errors=True)
    started = time.perf_counter()
    result = embed_images(images_uri, str(out), config, entry)
    ours = result.embedded / (time.perf_counter() - started)

    print(f"\n{'run':52s} {'images/s':>9s}")
    print(f"{'ceiling: forward on pre-decoded tensors':52s} {ceiling_rate:9.1f}")
    print(f"{'embedpipe embed (Parquet in, Parquet out)':52s} {ours:9.1f}")
    print(f"ratio embedpipe / ceiling: {ours / ceiling_rate:.2f}")
    achieved = ours * flops / 1e12
    print(f"model forward: {flops / 1e9:.2f} GFLOP/image; achieved {achieved:.2f} TFLOP/s")
    if args.peak_tflops:
        print(f"model FLOP utilisation: {achieved / args.peak_tflops:.1%}")


if __name__ == "__main__":
    main()
