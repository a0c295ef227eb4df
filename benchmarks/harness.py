"""Run one measurement in a fresh interpreter, so its peak memory is its own."""

import json
import resource
import subprocess
import sys
import time
from collections.abc import Callable


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
