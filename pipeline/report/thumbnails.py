"""The report's thumbnails: a few images with their ground truth and predictions overlaid, as small base64 JPEGs."""

from __future__ import annotations

import base64
import colorsys
import io
import zlib

import numpy as np
from PIL import Image as PILImage

from pipeline.errors import SegpipeError
from pipeline.io.decode import ImageDecodeError, decode_image
from pipeline.io.fs import join, url_to_fs
from pipeline.structures import ImagePrediction

SIDE = 192  # the longer side of each panel, in pixels
ALPHA = 0.55  # the overlay's opacity over the photograph


def category_colour(category_id: int) -> np.ndarray:
    """A stable, saturated colour per category (the same in every panel and every report)."""
    hue = (zlib.crc32(str(category_id).encode()) % 360) / 360.0
    return np.array(colorsys.hsv_to_rgb(hue, 0.85, 0.95)) * 255


def overlay(photo: np.ndarray, image: ImagePrediction) -> np.ndarray:
    """The photograph with each segment filled in its category's colour and segment edges in white.

    Segments are painted largest first, so a small instance lying on a large one stays visible."""
    labels = np.zeros((image.height, image.width), np.int32)
    colours = [np.zeros(3)]
    for segment in sorted(image.segments, key=lambda s: -s.area):
        labels[segment.rle.to_mask()] = len(colours)
        colours.append(category_colour(segment.category_id))
    painted = photo.astype(np.float64)
    covered = labels > 0
    painted[covered] = (1 - ALPHA) * painted[covered] + ALPHA * np.asarray(colours)[labels[covered]]
    edge = np.zeros_like(covered)
    edge[:, 1:] |= labels[:, 1:] != labels[:, :-1]
    edge[1:, :] |= labels[1:, :] != labels[:-1, :]
    painted[edge] = 255
    return painted.astype(np.uint8)


def _photo(folder: str | None, image: ImagePrediction) -> np.ndarray:
    """The image's pixels from the image folder; mid grey where there is no folder or no such file."""
    grey = np.full((image.height, image.width, 3), 128, np.uint8)
    if folder is None:
        return grey
    fs, path = url_to_fs(join(folder, image.file_name))
    try:
        rgb = decode_image(fs.cat_file(path))
    except FileNotFoundError:
        return grey
    except ImageDecodeError as error:
        raise SegpipeError(f"{join(folder, image.file_name)}: {error}") from None
    return rgb if rgb.shape[:2] == (image.height, image.width) else grey


def _jpeg(panels: list[np.ndarray]) -> str:
    """Panels side by side, scaled so the longer side is SIDE, as a base64 JPEG."""
    strip = np.concatenate([np.pad(p, ((0, 0), (0, 4), (0, 0)), constant_values=255) for p in panels], axis=1)[:, :-4]
    picture = PILImage.fromarray(strip)
    height, width = panels[0].shape[:2]
    scale = SIDE / max(height, width)
    picture = picture.resize((max(1, round(picture.width * scale)), max(1, round(height * scale))), PILImage.NEAREST)
    buffer = io.BytesIO()
    picture.save(buffer, format="JPEG", quality=85)
    return base64.b64encode(buffer.getvalue()).decode("ascii")


def strip(folder: str | None, *sides: ImagePrediction) -> str:
    """One image with each side's segments overlaid, side by side, as a base64 JPEG."""
    photo = _photo(folder, sides[0])
    return _jpeg([overlay(photo, side) for side in sides])


def shard(data, context) -> list[dict]:
    """The shard's chosen images, each as one JPEG: ground truth | predictions | compared predictions."""
    chosen = []
    sets = [data.truth, *([data.predictions, data.compare][:len(context.names)])]
    for i, image in enumerate(data.images):
        if image.id not in context.thumbnail_ids:
            continue
        photo = _photo(context.images, data.truth[i])
        panels = [overlay(photo, side[i]) for side in sets]
        chosen.append({"image_id": image.id, "file_name": image.file_name,
                       "panels": ["ground truth", *context.names],
                       "segments": [len(side[i].segments) for side in sets], "jpeg": _jpeg(panels)})
    return chosen


def merge(parts: list[list[dict]], context) -> dict:
    """Thumbnails in image-id order (the shards' order)."""
    return {"images": [item for part in parts for item in part]}
