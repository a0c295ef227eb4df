"""Seeded randomness that does not depend on process, platform or iteration order.

Each category or concept draws from its own generator, seeded from the user's
seed and its names through SHA-256 (Python's ``hash`` of a string changes per
process). Adding a category therefore never reshuffles the others.
"""

import hashlib
import random


def derived_seed(seed: int, *names: str) -> int:
    text = "\x1f".join([str(seed), *names])
    return int.from_bytes(hashlib.sha256(text.encode("utf-8")).digest()[:8], "big")


def rng_for(seed: int, *names: str) -> random.Random:
    return random.Random(derived_seed(seed, *names))
