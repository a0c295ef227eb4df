"""Training throughput: `embedpipe train` against open_clip's own trainer, same model,
batch and precision, in the same run.

- open_clip_train: ``open_clip_train.main.main([...])`` with ``--dataset-type synthetic``
  (random tensors made in the loop: no decoding, no I/O), ClipLoss, AdamW;
- embedpipe train: ``train_model`` in finetune mode on image-caption pairs (infonce, the
  same loss), its real data path: rendered JPEGs ingested to Parquet, decoded in
  DataLoader workers, captions from templates, tokenised per batch.

Both print samples/s per step; the figure is the median over the steps after the first
(warm-up). On CPU: ViT-S-32-alt, batch 32, fp32. With ``--device cuda``: clip_vitb16
(ViT-B-16), batch 256, bf16 autocast, and embedpipe's MFU estimate.

Usage: python benchmarks/train.py [--device cpu] [--steps 8] [--num-workers 1]
"""

import argparse
import json
import re
import shutil
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

import harness

from embedpipe.config import IngestSettings, TrainSettings
from embedpipe.core import datasets
from embedpipe.data.ingest import ingest_images
from embedpipe.models.registry import ModelEntry, get_entry
from embedpipe.train.stage import train_model

SMALL_MODEL = ModelEntry(
    name="vit_s32",
    library="open_clip",
    architecture="ViT-S-32-alt",
    embed_dim=256,
    image_size=224,
    text=True,
)
OPEN_CLIP_RATE = re.compile(r"Batch \(t\): [\d.]+, ([\d.]+)/s,")


def open_clip_trainer(architecture: str, batch: int, steps: int, device: str, precision: str):
    """Samples/s per logged step of open_clip's trainer on synthetic data."""
    with tempfile.TemporaryDirectory(prefix="open-clip-train-") as logs:
        argv = [
            "--dataset-type", "synthetic", "--train-num-samples", str(batch * steps),
            "--batch-size", str(batch), "--epochs", "1", "--model", architecture,
            "--device", device, "--precision", precision, "--workers", "0",
            "--log-every-n-steps", "1", "--logs", logs, "--name", "t", "--report-to", "",
        ]  # fmt: skip
        code = f"from open_clip_train.main import main; main({argv!r})"
        done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
        text = done.stdout + done.stderr
        if done.returncode:
            raise RuntimeError(f"open_clip_train failed: {text[-2000:]}")
    return [float(rate) for rate in OPEN_CLIP_RATE.findall(text)]


def embedpipe_trainer(entry, images_uri: str, out: Path, config: TrainSettings):
    """Samples/s per step of embedpipe's trainer, and its MFU estimates (GPU only)."""
    shutil.rmtree(out, ignore_errors=True)
    train_model(images_uri, str(out), config, entry)
    history = json.loads((out / ".embedpipe" / "metrics.json").read_text())["history"]
    steps = [r for r in history if "samples_per_s" in r]
    return [r["samples_per_s"] for r in steps], [r["mfu"] for r in steps if "mfu" in r]


def after_warmup(rates: list[float]) -> float:
    return statistics.median(rates[1:] or rates)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--steps", type=int, default=8)
    parser.add_argument("--batch-size", type=int, default=0, help="0: 32 on CPU, 256 on CUDA")
    parser.add_argument("--num-workers", type=int, default=1)
    parser.add_argument("--workdir", default=".bench/train")
    args = parser.parse_args()

    cuda = args.device.startswith("cuda")
    entry = get_entry("clip_vitb16") if cuda else SMALL_MODEL
    batch = args.batch_size or (256 if cuda else 32)
    precision = "amp_bf16" if cuda else "fp32"
    images = batch * args.steps
    work = Path(args.workdir)
    folder = work / f"jpegs-{images}"
    harness.generate(folder, images, 256)
    images_uri = str(work / f"images-{images}")
    if not Path(datasets.side_path(images_uri, datasets.MANIFEST_NAME)).exists():
        ingest_images([str(folder)], images_uri, IngestSettings())
    import torch

    print(
        f"model {entry.name} ({entry.architecture}), device {args.device}, batch {batch}, "
        f"{precision}, {args.steps} steps, {torch.get_num_threads()} torch threads, "
        f"{args.num_workers} decoding worker(s)"
    )
    baseline = open_clip_trainer(entry.architecture, batch, args.steps, args.device, precision)
    config = TrainSettings(
        model=entry.name,
        weights="random",
        mode="finetune",
        pairs="image_text",
        loss="infonce",
        batch_size=batch,
        steps=args.steps,
        precision=precision,
        device=args.device,
        num_workers=args.num_workers,
        val_every=0,
        lr=1e-5,
    )
    ours, mfus = embedpipe_trainer(entry, images_uri, work / "model", config)

    theirs_rate, ours_rate = after_warmup(baseline), after_warmup(ours)
    print(f"\n{'run':60s} {'samples/s':>10s}")
    print(f"{'open_clip_train (synthetic tensors, no data path)':60s} {theirs_rate:10.1f}")
    print(f"{'embedpipe train (Parquet JPEGs, decode, tokenise)':60s} {ours_rate:10.1f}")
    print(f"ratio embedpipe / open_clip_train: {ours_rate / theirs_rate:.2f}")
    if mfus:
        print(f"embedpipe MFU: {after_warmup(mfus):.1%}")
    elif cuda:
        print("embedpipe MFU: unknown GPU (no peak FLOPs in embedpipe.train.loop.PEAK_FLOPS)")


if __name__ == "__main__":
    main()
