"""The OpenMP setting of a process that embeds images: call ``passive_wait()`` where such
a process starts (the embed and evaluate commands and components), before torch is
imported. Torch-free, so importing it sets nothing up."""

import os


def passive_wait() -> None:
    """Idle OpenMP threads sleep instead of spinning. Decoding workers share the CPU cores
    with the model's OpenMP threads; spinning idle threads steal time from decoding
    (measured: 0.77 -> 0.87 of the forward-only ceiling on 2 cores). OpenMP reads the
    setting when torch loads it, so a process that imported torch already keeps its own;
    a value set by the user is kept."""
    os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
