"""Embedding throughput: `embedpipe embed` against the fastest the model itself can run.

Generates rendered 256-px JPEGs, ingests them, then measures on this machine, with
embed's defaults for the device (batch size, decoding workers, precision, preprocessing):

- ceiling: the model's forward alone the fastest way it runs: bf16 weights on CUDA
  (fp32 on CPU, where embed stays exact to open_clip; the bf16 figure is printed
  beside it), inputs already on the device, attention through PyTorch's fused
  scaled-dot-product kernels (open_clip's attention with need_weights=False);
- decode only: embed's loader, decoding and preprocessing onto the device, no model;
- embedpipe embed: Parquet shards in, Parquet embeddings out.

It prints images/s for each, embedpipe/ceiling, and model FLOP utilisation (FLOPs of
one forward counted by torch's FlopCounterMode, against the device's dense bf16 peak
when the GPU is known, or ``--peak-tflops``). It runs unchanged with ``--device cuda``
(e.g. ``--model clip_vitb16 --device cuda``).

Usage: python benchmarks/embed.py [--images 5000] [--model NAME] [--device cpu]
"""

import argparse
import shutil
import time
from pathlib import Path

import harness

from embedpipe.config import EmbedSettings, IngestSettings
from embedpipe.core import datasets
from embedpipe.data.ingest import ingest_images
from embedpipe.embed.openmp import passive_wait
from embedpipe.models.registry import ModelEntry, get_entry

passive_wait()  # before torch loads, as `embedpipe embed` does

from embedpipe.embed import loader, runtime  # noqa: E402
from embedpipe.embed.images import embed_images  # noqa: E402
from embedpipe.models.loading import load_model  # noqa: E402
from embedpipe.models.precision import resolve_name  # noqa: E402

SMALL_MODEL = ModelEntry(
    name="vit_s32", library="open_clip", architecture="ViT-S-32-alt", embed_dim=256, image_size=224
)
# Dense bf16 tensor-core peaks (TFLOP/s) by device-name fragment, most specific first.
PEAK_BF16_TFLOPS = [
    ("H100 PCIe", 756.0),
    ("H100", 989.0),
    ("H200", 989.0),
    ("GH200", 989.0),
    ("B200", 2250.0),
    ("A100", 312.0),
    ("L40S", 362.0),
    ("L4", 121.0),
]


def synchronize(device) -> None:
    import torch

    if device.type == "cuda":
        torch.cuda.synchronize(device)


def model_flops_per_image(model, size: int, device, dtype) -> float:
    """Forward FLOPs of one image, counted by torch's FLOP counter."""
    import torch
    from torch.utils.flop_counter import FlopCounterMode

    with FlopCounterMode(display=False) as counter, torch.inference_mode():
        model.encode_images(torch.zeros(1, 3, size, size, device=device, dtype=dtype))
    return counter.get_total_flops()


def ceiling(entry, config: EmbedSettings, images: int) -> tuple[float, float]:
    """images/s of the forward alone on one batch already on the device; FLOPs/image."""
    import torch

    device = runtime.resolve_device(config.device)
    model = load_model(entry, "random", str(device))
    inference = runtime.prepare_inference(model, config, device)
    size = model.preprocess_spec.size
    pixels = torch.randn(
        inference.batch_size, 3, *size, generator=torch.Generator().manual_seed(0)
    ).to(device, inference.input_dtype)
    steps = max(1, images // inference.batch_size)
    with inference.running():
        inference.encode_images(pixels, config.normalize)  # warm-up (and compile)
        synchronize(device)
        started = time.perf_counter()
        for _ in range(steps):
            inference.encode_images(pixels, config.normalize)
        synchronize(device)
    rate = steps * inference.batch_size / (time.perf_counter() - started)
    return rate, model_flops_per_image(model, size[0], device, inference.input_dtype)


def decode_only(images_uri: str, entry, config: EmbedSettings) -> float:
    """images/s of embed's loader, decoding and preprocessing onto the device, no model."""
    device = runtime.resolve_device(config.device)
    model = load_model(entry, "random", "cpu")  # only its transform and preprocessing spec
    inference = runtime.prepare_inference(
        model, config.model_copy(update={"compile": False}), device
    )
    work, _, _ = loader.plan_work(images_uri)
    options = runtime.loader_options(config, device)
    started = time.perf_counter()
    count = 0
    for batch in loader.device_batches(work, inference, options):
        count += len(batch.ok)
    synchronize(device)
    return count / (time.perf_counter() - started)


def peak_tflops(device, given: float) -> tuple[float, str]:
    import torch

    if given:
        return given, "given"
    if device.type != "cuda":
        return 0.0, "CPU"
    name = torch.cuda.get_device_name(device)
    for fragment, peak in PEAK_BF16_TFLOPS:
        if fragment in name:
            return peak, name
    return 0.0, name


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--images", type=int, default=5_000)
    parser.add_argument("--model", default="", help="registry name (default: ViT-S-32-alt)")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--batch-size", type=int, default=0, help="0: embed's default")
    parser.add_argument("--num-workers", type=int, default=None, help="default: embed's")
    parser.add_argument("--precision", default="auto")
    parser.add_argument("--preprocess", default="auto")
    parser.add_argument("--compile", action="store_true")
    parser.add_argument(
        "--peak-tflops", type=float, default=0.0, help="the device's dense bf16 peak, for MFU"
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
        precision=args.precision,
        preprocess=args.preprocess,
        compile=args.compile,
    )
    import torch

    device = runtime.resolve_device(config.device)
    precision = resolve_name(config.precision, device)
    preprocess = runtime.resolve_preprocess(config.preprocess, device)
    print(
        f"model {entry.name} ({entry.architecture}), device {device}, "
        f"{torch.get_num_threads()} torch threads, "
        f"{runtime.resolve_workers(config, device, preprocess)} decoding worker(s), "
        f"batch {runtime.resolve_batch_size(config, entry, device)}, precision {precision}, "
        f"preprocess {preprocess}"
    )

    ceiling_rate, flops = ceiling(entry, config, args.images)
    rows = [(f"ceiling: forward only, inputs on the device ({precision})", ceiling_rate)]
    if device.type == "cpu" and precision == "fp32":
        bf16 = config.model_copy(update={"precision": "bf16"})
        rows.append(("ceiling with bf16 weights (for comparison)", ceiling(entry, bf16, 1024)[0]))
    decoding = decode_only(images_uri, entry, config)
    rows.append((f"decode only: loader + decode + preprocess ({preprocess})", decoding))
    out = work / "embeddings"
    shutil.rmtree(out, ignore_errors=True)
    started = time.perf_counter()
    result = embed_images(images_uri, str(out), config, entry)
    ours = result.embedded / (time.perf_counter() - started)
    rows.append(("embedpipe embed (Parquet in, Parquet out)", ours))

    print(f"\n{'run':60s} {'images/s':>9s}")
    for name, rate in rows:
        print(f"{name:60s} {rate:9.1f}")
    print(f"ratio embedpipe / ceiling: {ours / ceiling_rate:.2f}")
    achieved = ours * flops / 1e12
    print(f"model forward: {flops / 1e9:.2f} GFLOP/image; embedpipe: {achieved:.2f} TFLOP/s")
    peak, source = peak_tflops(device, args.peak_tflops)
    if peak:
        ceiling_mfu = ceiling_rate * flops / 1e12 / peak
        print(
            f"model FLOP utilisation: embedpipe {achieved / peak:.1%}, ceiling {ceiling_mfu:.1%} "
            f"of {peak:.0f} TFLOP/s ({source})"
        )
    else:
        print(f"model FLOP utilisation: unknown (no peak known for {source}; --peak-tflops)")


if __name__ == "__main__":
    main()
