"""The bad-image corpus: what converts, and the reason recorded for what cannot."""

import io

import numpy as np
import pytest
from PIL import Image

from pipeline.io.decode import ImageDecodeError, decode_image


def _encode(image: Image.Image, fmt: str) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format=fmt)
    return buffer.getvalue()


def test_convertible_images_become_rgb_uint8():
    rgb = np.random.default_rng(0).integers(0, 256, (9, 13, 3), dtype=np.uint8)
    cases = {
        "rgb png": (_encode(Image.fromarray(rgb), "PNG"), rgb),
        "rgba png": (_encode(Image.fromarray(np.dstack([rgb, np.full((9, 13), 7, np.uint8)]), "RGBA"), "PNG"), rgb),
        "gray png": (_encode(Image.fromarray(rgb[..., 0], "L"), "PNG"), np.repeat(rgb[..., :1], 3, axis=2)),
        "16-bit gray png": (_encode(Image.fromarray(rgb[..., 0].astype(np.uint16) * 257), "PNG"),
                            np.repeat(rgb[..., :1], 3, axis=2)),
    }
    for name, (data, expected) in cases.items():
        decoded = decode_image(data)
        assert decoded.dtype == np.uint8 and decoded.shape == (9, 13, 3), name
        np.testing.assert_array_equal(decoded, expected, err_msg=name)
    cmyk = decode_image(_encode(Image.new("CMYK", (5, 4), (0, 255, 255, 0)), "JPEG"))
    assert cmyk.shape == (4, 5, 3) and cmyk[..., 0].min() > 200 and cmyk[..., 1].max() < 60  # red
    # A palette image decodes to its palette's colours, as PIL looks them up.
    indexed = Image.fromarray(rgb).convert("P")
    looked_up = np.asarray(indexed.getpalette(), np.uint8).reshape(-1, 3)[np.asarray(indexed)]
    np.testing.assert_array_equal(decode_image(_encode(indexed, "PNG")), looked_up)


@pytest.mark.parametrize("data, reason", [
    (b"", "empty file"),
    (b"this is not an image", "not an image"),
    (_encode(Image.new("RGB", (64, 64), (10, 200, 30)), "JPEG")[:200], "truncated"),
])
def test_unusable_bytes_give_a_reason(data, reason):
    with pytest.raises(ImageDecodeError, match=reason):
        decode_image(data)


def test_enormous_images_are_refused_before_decoding():
    data = _encode(Image.new("L", (3000, 2000)), "PNG")
    with pytest.raises(ImageDecodeError, match="too large: 3000x2000 pixels"):
        decode_image(data, max_pixels=5_000_000)
