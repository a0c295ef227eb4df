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

Contrastive batches past memory (``[train].micro_batch``, gradient caching), in the same
run: one optimizer step of a tiny open_clip model (2 layers of width 128 per tower, 32 px
images, 16 tokens; infonce) at contrastive batch 256, 1,024 and 4,096, with a fixed
micro-batch of 64 against the plain step, each in a fresh process: samples/s and peak
memory (CPU: the process's peak resident set, ru_maxrss; CUDA:
torch.cuda.max_memory_allocated). Then, on CPU only, the largest contrastive batch (doubling
from 128) whose step fits a memory cap of 256 MB of address space above what the process
holds after a warm-up step (resource.setrlimit(RLIMIT_AS) in the subprocess), plain
against cached.

Usage: python benchmarks/train.py [--device cpu] [--steps 8] [--num-workers 1]
       [--part both|trainers|contrastive] [--cap-mb 256]
"""

import argparse
import json
import os
import re
import resource
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

CONTRASTIVE_BATCHES = (256, 1024, 4096)
MICRO_BATCH = 64
TINY_CLIP = {
    "embed_dim": 64,
    "vision_cfg": {"image_size": 32, "layers": 2, "width": 128, "patch_size": 8},
    "text_cfg": {"context_length": 16, "vocab_size": 1000, "width": 128, "heads": 2, "layers": 2},
}

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


class _PairsTask:
    """The finetune task's two loss halves on ready tensors (no data path)."""

    def __init__(self, loss):
        self.loss = loss

    def features_of(self, forward, batch):
        return forward(batch["pixels"], batch["second"])

    def loss_from(self, features, batch):
        image, other, scale, bias = features
        return self.loss(image.float(), other.float(), scale.float(), bias)

    def loss_of(self, forward, batch):
        return self.loss_from(self.features_of(forward, batch), batch)


def _vm_bytes() -> int:
    with open("/proc/self/status") as status:
        line = next(row for row in status if row.startswith("VmSize:"))
    return int(line.split()[1]) * 1024


def measure_step(batch: int, micro: int, device: str, cap_mb: int) -> dict:
    """One optimizer step at contrastive ``batch`` (cached with ``micro`` > 0) after a
    warm-up step at the micro-batch size; under ``cap_mb`` MB of extra address space when
    ``cap_mb`` > 0. Runs in its own process (``--measure-step``)."""
    import time

    import open_clip
    import torch

    from embedpipe.train.finetune import DualEncoder
    from embedpipe.train.gradcache import cached_backward
    from embedpipe.train.losses import get_loss

    torch.manual_seed(0)
    clip = open_clip.CLIP(**TINY_CLIP).to(device).train()
    forward = DualEncoder(clip, image_text=True)
    task = _PairsTask(get_loss("infonce"))
    optimizer = torch.optim.AdamW(forward.parameters(), lr=1e-5)
    size = TINY_CLIP["vision_cfg"]["image_size"]
    context = TINY_CLIP["text_cfg"]["context_length"]

    def make(rows: int) -> dict:
        return {
            "rows": torch.arange(rows),
            "pixels": torch.randn(rows, 3, size, size, device=device),
            "second": torch.randint(1, 1000, (rows, context), device=device),
        }

    def autocast():
        return torch.autocast("cuda", dtype=torch.bfloat16, enabled=device.startswith("cuda"))

    def step(data: dict) -> None:
        if micro:
            cached_backward(task, forward, data, micro, autocast)
        else:
            with autocast():
                loss = task.loss_of(forward, data)
            loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    step(make(micro or 64))  # warm-up: threads, allocator, optimizer state
    data = make(batch)
    cuda = device.startswith("cuda")
    if cuda:
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
    if cap_mb:
        limit = _vm_bytes() + cap_mb * 2**20
        resource.setrlimit(resource.RLIMIT_AS, (limit, limit))
    started = time.perf_counter()
    try:
        step(data)
        if cuda:
            torch.cuda.synchronize()
    except (MemoryError, RuntimeError) as error:
        if cap_mb and ("memory" in str(error).lower() or isinstance(error, MemoryError)):
            return {"fits": False}
        raise
    seconds = time.perf_counter() - started
    peak = (
        torch.cuda.max_memory_allocated() / 2**20
        if cuda
        else resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    )
    return {"fits": True, "samples_per_s": batch / seconds, "peak_mb": peak}


def _step_in_process(batch: int, micro: int, device: str, cap_mb: int = 0) -> dict:
    command = [sys.executable, __file__, "--measure-step", str(batch), str(micro), device]
    command += [str(cap_mb)]
    environment = {**os.environ, "PYTHONWARNINGS": "ignore"}
    done = subprocess.run(command, capture_output=True, text=True, env=environment)
    if done.returncode:
        if cap_mb:  # killed past the cap outside Python's reach
            return {"fits": False}
        raise RuntimeError(f"step {batch}/{micro} failed: {done.stderr[-2000:]}")
    return json.loads(done.stdout.strip().splitlines()[-1])


def largest_fitting(micro: int, device: str, cap_mb: int, limit: int = 32768) -> int:
    fitting, batch = 0, 128
    while batch <= limit and _step_in_process(batch, micro, device, cap_mb)["fits"]:
        fitting, batch = batch, batch * 2
    return fitting


def contrastive_table(device: str, cap_mb: int) -> None:
    print(
        f"\ncontrastive batch past memory: tiny open_clip (32 px, 16 tokens), infonce, "
        f"one step, micro-batch {MICRO_BATCH}, device {device}"
    )
    memory = "peak MB (GPU allocated)" if device.startswith("cuda") else "peak RSS MB"
    print(f"{'batch':>6s} {'plain samples/s':>16s} {'cached samples/s':>17s} "
          f"{'plain ' + memory:>28s} {'cached ' + memory:>28s}")  # fmt: skip
    for batch in CONTRASTIVE_BATCHES:
        plain = _step_in_process(batch, 0, device)
        cached = _step_in_process(batch, MICRO_BATCH, device)
        print(
            f"{batch:6d} {plain['samples_per_s']:16.1f} {cached['samples_per_s']:17.1f} "
            f"{plain['peak_mb']:28.0f} {cached['peak_mb']:28.0f}"
            f"   ratio cached/plain: speed {cached['samples_per_s'] / plain['samples_per_s']:.2f},"
            f" memory {cached['peak_mb'] / plain['peak_mb']:.2f}"
        )
    if device.startswith("cuda"):
        return
    plain_max = largest_fitting(0, device, cap_mb)
    cached_max = largest_fitting(MICRO_BATCH, device, cap_mb)
    print(
        f"largest contrastive batch within {cap_mb} MB above the warmed-up process: "
        f"plain {plain_max}, cached (micro-batch {MICRO_BATCH}) {cached_max}, "
        f"ratio {cached_max / max(plain_max, 1):.0f}x"
    )


def main() -> None:
    if len(sys.argv) > 1 and sys.argv[1] == "--measure-step":
        batch, micro, device, cap = sys.argv[2:6]
        print(json.dumps(measure_step(int(batch), int(micro), device, int(cap))))
        return
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--steps", type=int, default=8)
    parser.add_argument("--batch-size", type=int, default=0, help="0: 32 on CPU, 256 on CUDA")
    parser.add_argument("--num-workers", type=int, default=1)
    parser.add_argument("--workdir", default=".bench/train")
    parser.add_argument("--part", choices=("both", "trainers", "contrastive"), default="both")
    parser.add_argument("--cap-mb", type=int, default=256)
    args = parser.parse_args()
    if args.part == "contrastive":
        contrastive_table(args.device, args.cap_mb)
        return

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
    if args.part == "both":
        contrastive_table(args.device, args.cap_mb)


if __name__ == "__main__":
    main()
