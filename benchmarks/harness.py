"""Run one measurement in a fresh interpreter, so its peak memory is its own."""

import json
import resource
import shutil
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np

from embedpipe.core.seeding import derived_seed
from embedpipe.data.demo_data import COLOURS, SHAPES, concept_names, render_image


def measure(script: str, mode: str, *args: str) -> dict:
    """Run ``script --measure MODE ARGS...``; return the figures it printed last."""
    command = [sys.executable, script, "--measure", mode, *map(str, args)]
    done = subprocess.run(command, capture_output=True, text=True, check=True)
    lines = done.stdout.strip().splitlines()
    figures = json.loads(lines[-1])
    for line in lines[:-1]:  # extra figures a run prints as key=value
        key, _, value = line.partition("=")
        if value:
            figures[key] = float(value)
    return figures


def report(run: Callable[[], int]) -> None:
    """Time ``run`` (which returns how many items it handled) and print the figures."""
    started = time.perf_counter()
    items = run()
    seconds = time.perf_counter() - started
    peak_mb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    print(json.dumps({"items": items, "seconds": seconds, "peak_mb": peak_mb}))


def compare(script: str, runs: dict[str, str], source: Path, workdir: Path, unit: str) -> None:
    """Measure each of ``runs`` (name -> mode, the baseline first) into a fresh
    ``workdir/out-MODE`` and print seconds, peak memory and speed against the baseline."""
    results = {}
    for name, mode in runs.items():
        out = workdir / f"out-{mode}"
        shutil.rmtree(out, ignore_errors=True)
        results[name] = measure(script, mode, source, out)
    base = next(iter(results.values()))
    print(f"\n{'run':40s} {unit:>7s} {'seconds':>8s} {'peak MiB':>9s} {'x baseline':>10s}")
    for name, figures in results.items():
        speed = base["seconds"] / figures["seconds"]
        print(
            f"{name:40s} {figures['items']:7d} {figures['seconds']:8.2f} "
            f"{figures['peak_mb']:9.0f} {speed:10.2f}"
        )


FOLDERS = [
    (shape, concept) for c, shape in enumerate(SHAPES) for concept in concept_names(c, len(COLOURS))
]


def generate(root: Path, count: int, size: int) -> None:
    """``count`` rendered JPEGs spread round-robin over 8 categories x 8 concepts."""
    if (root / ".complete").exists():
        return
    shutil.rmtree(root, ignore_errors=True)
    for i in range(count):
        shape, concept = FOLDERS[i % len(FOLDERS)]
        directory = root / shape / concept
        directory.mkdir(parents=True, exist_ok=True)
        rng = np.random.default_rng(derived_seed(0, shape, concept, str(i)))
        image = render_image(shape, concept, size, rng)
        image.save(directory / f"{i:05d}.jpg", "JPEG", quality=90)
    (root / ".complete").write_text(str(count))
