"""Image bytes to RGB arrays: convert what can be converted, name the reason for what cannot."""

from __future__ import annotations

import io
import warnings

import numpy as np
from PIL import Image

MAX_PIXELS = 100_000_000  # about 10,000 x 10,000; Pillow's own bomb guard is near this


class ImageDecodeError(ValueError):
    """An image that cannot be used; the message is the reason, for an errors table."""


def decode_image(data: bytes, max_pixels: int = MAX_PIXELS) -> np.ndarray:
    """H x W x 3 uint8 RGB from encoded bytes.

    Grayscale, palette, RGBA (alpha dropped), CMYK and 16-bit images are converted (16-bit keeps its
    high byte). Pixels stay as stored, EXIF orientation is not applied, as COCO's annotations assume.
    """
    if not data:
        raise ImageDecodeError("empty file")
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            image = Image.open(io.BytesIO(data))
            width, height = image.size
            if width * height > max_pixels:
                raise ImageDecodeError(f"too large: {width}x{height} pixels, more than {max_pixels}")
            image.load()
    except ImageDecodeError:
        raise
    except (Image.DecompressionBombError, Image.DecompressionBombWarning) as error:
        raise ImageDecodeError(f"too large ({error})") from None
    except Image.UnidentifiedImageError:
        raise ImageDecodeError("not an image (unknown format)") from None
    except (OSError, SyntaxError, ValueError) as error:
        reason = "truncated" if "truncated" in str(error).lower() else f"corrupt ({error})"
        raise ImageDecodeError(reason) from None
    if image.mode in ("I;16", "I;16B", "I;16L", "I"):
        wide = np.asarray(image, dtype=np.uint32)
        image = Image.fromarray((wide >> 8).clip(0, 255).astype(np.uint8), "L")
    elif image.mode == "F":
        raise ImageDecodeError("floating-point image: no RGB meaning")
    return np.asarray(image.convert("RGB"))
