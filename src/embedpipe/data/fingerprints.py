"""Perceptual hashes of encoded images. Kept light (Pillow, imagehash, numpy) because
worker processes import it: they start in a fraction of the time a faiss import takes."""

import io

import imagehash
import numpy as np
from PIL import Image

HASHERS = {
    "phash": imagehash.phash,
    "dhash": imagehash.dhash,
    "whash": imagehash.whash,
    "colorhash": imagehash.colorhash,
}
# imagehash resizes to hash_size * 4 pixels (phash); JPEGs decode straight to about that.
DRAFT_FACTOR = 4


def fingerprint(data: bytes, method: str, hash_size: int) -> bytes | None:
    """The packed perceptual hash of an encoded image, or None if it cannot be decoded."""
    try:
        with Image.open(io.BytesIO(data)) as image:
            side = hash_size * DRAFT_FACTOR
            image.draft("RGB", (side, side))
            if method == "colorhash":
                value = imagehash.colorhash(image, binbits=max(2, hash_size // 2))
            else:
                value = HASHERS[method](image, hash_size=hash_size)
    except Exception:  # Pillow raises many types for broken files
        return None
    return np.packbits(np.asarray(value.hash, dtype=bool).reshape(-1)).tobytes()


def fingerprint_chunk(chunk: list[bytes], method: str, hash_size: int) -> list[bytes | None]:
    return [fingerprint(data, method, hash_size) for data in chunk]


def code_bytes(method: str, hash_size: int) -> int:
    """Length of a packed fingerprint for these settings (hash a fixed image to know)."""
    buffer = io.BytesIO()
    Image.new("RGB", (64, 64), (128, 64, 32)).save(buffer, "PNG")
    return len(fingerprint(buffer.getvalue(), method, hash_size))
