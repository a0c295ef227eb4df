"""The one decoding path of ingest and embed: caps checked from the header, EXIF
orientation, 16-bit greyscale, deterministic reasons."""

import io

import numpy as np
import pytest
from conftest import jpeg_with_orientation, png_claiming, sixteen_bit_png, strip_png
from PIL import Image, ImageFile, ImageOps

from embedpipe.core import images
from embedpipe.core.images import DEFAULT_LIMITS, ImageLimits, ImageRejected
from embedpipe.embed.pixels import decode


def test_embed_decode_refuses_a_strip_that_a_resize_would_blow_up():
    data = strip_png()
    assert len(data) < 200  # the 132-byte file of the issue, give or take
    with pytest.raises(ValueError, match=r"extreme aspect ratio: 16000x1 is over max_aspect"):
        decode(data, None)


def test_pixel_cap_is_checked_from_the_header_before_any_decoding(monkeypatch):
    claimed = png_claiming(20_000, 5_000)  # 100M pixels in a 60-byte file
    decoded = []
    monkeypatch.setattr(ImageFile.ImageFile, "load", lambda self: decoded.append(self.size))
    for check in (lambda: decode(claimed, None), lambda: images.inspect(claimed, DEFAULT_LIMITS)):
        with pytest.raises(ImageRejected, match=r"too many pixels: 20000x5000 is over max_pixels"):
            check()
    assert decoded == []
    beyond_pillow = png_claiming(20_000, 20_000)  # past twice Pillow's own threshold
    with pytest.raises(ImageRejected, match="too many pixels"):
        decode(beyond_pillow, None)


def test_caps_follow_the_limits_given():
    small = ImageLimits(max_pixels=100, max_aspect_ratio=2.0)
    with pytest.raises(ImageRejected, match="max_pixels=100"):
        images.decode_rgb(strip_png(20, 20), small)
    with pytest.raises(ImageRejected, match="max_aspect_ratio=2"):
        images.decode_rgb(strip_png(9, 3), small)
    assert images.decode_rgb(strip_png(8, 4), small).size == (8, 4)


def test_sixteen_bit_greyscale_is_scaled_to_eight_bits_not_saturated():
    levels = np.arange(0, 65536, 64, dtype=np.int64).reshape(32, 32)
    data = sixteen_bit_png(levels)
    assert Image.open(io.BytesIO(data)).mode.startswith("I")
    pixels = np.asarray(decode(data, None)).astype(np.int64)
    assert pixels.shape == (32, 32, 3)
    expected = np.round(levels / 257.0)
    for channel in range(3):
        np.testing.assert_allclose(pixels[..., channel], expected, atol=1)
    assert pixels.min() == 0 and pixels.max() == 255 and 120 < pixels.mean() < 135


@pytest.mark.parametrize("orientation", [1, 3, 6, 8])
def test_exif_orientation_is_applied_as_pillow_displays_it(orientation):
    data = jpeg_with_orientation(orientation)
    ours = decode(data, None)
    displayed = ImageOps.exif_transpose(Image.open(io.BytesIO(data))).convert("RGB")
    assert ours.size == displayed.size
    assert np.array_equal(np.asarray(ours), np.asarray(displayed))
    assert images.inspect(data, DEFAULT_LIMITS) == displayed.size
    if orientation == 6:  # turned 90 degrees clockwise: red on top, blue below
        top, bottom = np.asarray(ours)[5, 10], np.asarray(ours)[-5, 10]
        assert top[0] > 150 > top[2] and bottom[2] > 150 > bottom[0]


def test_reasons_carry_no_object_addresses():
    with pytest.raises(ImageRejected) as caught:
        images.inspect(b"not an image at all", DEFAULT_LIMITS)
    reason = str(caught.value)
    assert reason.startswith("cannot decode image: UnidentifiedImageError")
    assert " at 0x" not in reason
    error = ValueError("broken <_io.BytesIO object at 0x7f3a2b1c> here")
    assert images.error_reason(error) == "ValueError: broken <data> here"
