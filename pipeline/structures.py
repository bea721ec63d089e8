"""Plain types that stages pass around, with exact conversions to COCO RLE, COCO panoptic PNG and Arrow."""

from __future__ import annotations

import io
from collections.abc import Iterable, Sequence
from dataclasses import dataclass

import numpy as np
import pyarrow as pa
import pyspng
from PIL import Image
from pycocotools import mask as mask_utils

from pipeline.errors import SegpipeError
from pipeline.schemas import arrow_schema

VOID = 0
MAX_SEGMENT_ID = 256**3 - 1  # the largest id an RGB panoptic PNG can hold


@dataclass(frozen=True)
class Rle:
    """A binary mask as COCO compressed RLE: column-major run lengths, encoded as a string."""

    counts: str
    height: int
    width: int

    @classmethod
    def from_mask(cls, mask: np.ndarray) -> Rle:
        """Encode a 2-D boolean or 0/1 mask."""
        if mask.ndim != 2:
            raise ValueError(f"a mask must be 2-D, got shape {mask.shape}")
        # A column-major bool mask (as `from_panoptic` makes them) is encoded without a copy.
        encoded = mask_utils.encode(np.asfortranarray(mask.view(np.uint8) if mask.dtype == bool else mask, np.uint8))
        return cls(encoded["counts"].decode("ascii"), mask.shape[0], mask.shape[1])

    @classmethod
    def from_coco(cls, segmentation: dict | list, height: int, width: int) -> Rle:
        """From a COCO `segmentation`: compressed RLE, uncompressed RLE or polygons."""
        if not segmentation:  # an empty polygon list: an empty mask (frPyObjects would raise IndexError)
            return cls.from_mask(np.zeros((height, width), bool))
        if isinstance(segmentation, list):  # polygons, rasterised the way pycocotools does
            return cls._from_encoded(mask_utils.merge(mask_utils.frPyObjects(segmentation, height, width)))
        if isinstance(segmentation["counts"], list):
            return cls._from_encoded(mask_utils.frPyObjects(segmentation, height, width))
        return cls._from_encoded(segmentation)

    @classmethod
    def _from_encoded(cls, encoded: dict) -> Rle:
        counts = encoded["counts"]
        counts = counts.decode("ascii") if isinstance(counts, bytes) else counts
        return cls(counts, int(encoded["size"][0]), int(encoded["size"][1]))

    def to_coco(self) -> dict:
        """The COCO form, `{"size": [h, w], "counts": str}`, as result files carry it."""
        return {"size": [self.height, self.width], "counts": self.counts}

    def encoded(self) -> dict:
        """The form pycocotools' mask functions take (counts as bytes)."""
        return {"size": [self.height, self.width], "counts": self.counts.encode("ascii")}

    def to_mask(self) -> np.ndarray:
        """Decode to a boolean array of shape (height, width)."""
        return mask_utils.decode(self.encoded()).astype(bool)

    def area(self) -> int:
        return int(mask_utils.area(self.encoded()))

    def bbox(self) -> tuple[float, float, float, float]:
        """Tight box `[x, y, w, h]` of the mask; zeros for an empty mask (as pycocotools)."""
        return tuple(float(v) for v in mask_utils.toBbox(self.encoded()))


@dataclass(frozen=True)
class Segment:
    """One segment of one image: a thing instance or a stuff region, with its mask."""

    id: int
    category_id: int
    rle: Rle
    area: int
    bbox: tuple[float, float, float, float]
    score: float = 1.0
    iscrowd: bool = False
    stability: float | None = None
    """How little the mask changes between a lower and a higher cut of the model's soft output (pipeline.signals)."""
    flip_iou: float | None = None
    """Best IoU with a same-category segment predicted on the mirrored image, mirrored back (pipeline.signals)."""
    point_coords: tuple[tuple[float, float], ...] | None = None
    """The point prompts ([x, y] pixels) that produced a class-agnostic proposal (SAM)."""
    crop_box: tuple[float, float, float, float] | None = None
    """The crop ([x, y, width, height]) a proposal was generated in (SAM)."""
    class_agreement: float | None = None
    """For a proposal given a class by a panoptic model: the share of its pixels that model gives the class."""

    @classmethod
    def from_rle(cls, id: int, category_id: int, rle: Rle, score: float = 1.0, iscrowd: bool = False,
                 stability: float | None = None) -> Segment:
        """A segment whose area and box are measured from its mask."""
        return cls(id, category_id, rle, rle.area(), rle.bbox(), score, iscrowd, stability)

    @classmethod
    def from_mask(cls, id: int, category_id: int, mask: np.ndarray, score: float = 1.0,
                  iscrowd: bool = False, stability: float | None = None) -> Segment:
        return cls.from_rle(id, category_id, Rle.from_mask(mask), score, iscrowd, stability)

    def segment_info(self) -> dict:
        """The COCO panoptic `segments_info` entry (integer box, as the COCO files carry it)."""
        return {"id": self.id, "category_id": self.category_id, "iscrowd": int(self.iscrowd),
                "bbox": [int(v) for v in self.bbox], "area": self.area}


@dataclass(frozen=True)
class ImagePrediction:
    """All segments of one image (predicted or ground truth)."""

    image_id: int
    file_name: str
    height: int
    width: int
    segments: tuple[Segment, ...] = ()

    def to_panoptic(self) -> tuple[np.ndarray, list[dict]]:
        """The panoptic id map (uint32, 0 = VOID) and `segments_info`; segments must not overlap."""
        ids = np.zeros((self.height, self.width), np.uint32)
        for segment in self.segments:
            if not 0 < segment.id <= MAX_SEGMENT_ID:
                raise ValueError(f"image {self.image_id}: segment id {segment.id} outside 1..{MAX_SEGMENT_ID}")
            mask = segment.rle.to_mask()
            if ids[mask].any():
                raise ValueError(f"image {self.image_id}: segment {segment.id} overlaps another segment")
            ids[mask] = segment.id
        return ids, [segment.segment_info() for segment in self.segments]

    @classmethod
    def from_panoptic(cls, image_id: int, file_name: str, ids: np.ndarray,
                      segments_info: Sequence[dict]) -> ImagePrediction:
        """From an id map and its `segments_info`; area and box are measured from the pixels."""
        ids = np.asfortranarray(ids)  # so that each `ids == id` is column-major, as COCO RLE runs
        segments = tuple(
            Segment.from_mask(info["id"], info["category_id"], ids == info["id"],
                              score=float(info.get("score", 1.0)), iscrowd=bool(info.get("iscrowd", 0)),
                              stability=info.get("stability"))
            for info in segments_info
        )
        return cls(image_id, file_name, ids.shape[0], ids.shape[1], segments)

    def to_coco_results(self) -> list[dict]:
        """COCO instance results (one dict per segment), as `COCO.loadRes` takes them."""
        return [
            {"image_id": self.image_id, "category_id": s.category_id, "segmentation": s.rle.to_coco(),
             "bbox": list(s.bbox), "area": s.area, "score": s.score}
            for s in self.segments
        ]


def rle_counts(counts: str) -> list[int]:
    """Run lengths of a COCO compressed RLE string; ValueError for a malformed one (the matcher's decoder)."""
    from pipeline.evaluate.match import decode_strings  # numba loads only where RLE strings are read

    if not counts.isascii():
        position = next(k for k, c in enumerate(counts) if not c.isascii())
        raise ValueError(f"character {counts[position]!r} at {position} is outside the RLE alphabet")
    runs = decode_strings([counts])
    return runs.lengths.tolist()


# --- COCO panoptic PNG: id = R + 256 G + 256^2 B -----------------------------------------------


def ids_to_rgb(ids: np.ndarray) -> np.ndarray:
    """Panoptic id map to an RGB array (uint8, H x W x 3)."""
    ids = np.asarray(ids)
    if ids.size and (ids.min() < 0 or ids.max() > MAX_SEGMENT_ID):
        raise ValueError(f"panoptic ids must lie in 0..{MAX_SEGMENT_ID}")
    ids = ids.astype(np.uint32)
    return np.stack([ids & 255, (ids >> 8) & 255, (ids >> 16) & 255], axis=-1).astype(np.uint8)


def rgb_to_ids(rgb: np.ndarray) -> np.ndarray:
    """RGB array (H x W x 3, uint8) to a panoptic id map (uint32)."""
    height, width = rgb.shape[:2]
    n = height * width
    # Read each pixel's 3 bytes (plus the next pixel's first) as one little-endian uint32 and keep
    # the low 24 bits: one pass instead of three conversions, shifts and ors (about 4x faster).
    padded = np.empty(3 * n + 1, np.uint8)
    padded[:3 * n] = np.asarray(rgb, np.uint8).reshape(-1)
    padded[3 * n] = 0
    words = np.ndarray((n,), dtype="<u4", buffer=padded, strides=(3,))
    return (words & 0xFFFFFF).reshape(height, width)


def encode_panoptic_png(ids: np.ndarray, compress_level: int = 1) -> bytes:
    """PNG bytes of a panoptic id map. Level 1 trades a slightly larger file for a fast write."""
    buffer = io.BytesIO()
    Image.fromarray(ids_to_rgb(ids), "RGB").save(buffer, format="PNG", compress_level=compress_level)
    return buffer.getvalue()


_PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"
_PNG_COLOR_TYPES = {0: "grayscale", 2: "RGB", 3: "palette", 4: "grayscale+alpha", 6: "RGBA"}


def decode_panoptic_png(data: bytes, where: str) -> np.ndarray:
    """Panoptic id map (uint32) from PNG bytes; `where` names the file in the error for anything else."""
    ids = panoptic_words(data, where)
    ids &= 0xFFFFFF
    return ids


def panoptic_words(data: bytes, where: str) -> np.ndarray:
    """A panoptic PNG decoded to uint32 words R + 256 G + 256^2 B + 256^3 * 255: the id plus an alpha byte.

    The header is checked first (8-bit RGB is the only panoptic PNG), then pyspng decodes to RGBA,
    which makes each pixel one aligned little-endian word: no per-channel arithmetic. pyspng is about
    4x faster than Pillow on these files, and evaluation decodes two per image.
    """
    if data[:8] != _PNG_SIGNATURE or data[12:16] != b"IHDR" or len(data) < 33:
        kind = Image.open(io.BytesIO(data)).format if _opens(data) else None
        raise SegpipeError(f"{where}: is a {kind} file, not a PNG" if kind else f"{where}: cannot be read as a PNG")
    bit_depth, color_type = data[24], data[25]
    if (bit_depth, color_type) != (8, 2):
        kind = _PNG_COLOR_TYPES.get(color_type, f"color type {color_type}")
        raise SegpipeError(f"{where}: is a {bit_depth}-bit {kind} PNG; a COCO panoptic PNG is 8-bit RGB")
    try:
        rgba = pyspng.load(data, format="RGBA")
    except Exception as error:  # pyspng raises a bare Exception for corrupt data
        raise SegpipeError(f"{where}: cannot be read as a PNG ({error})") from None
    return rgba.view("<u4")[..., 0]


def _opens(data: bytes) -> bool:
    try:
        Image.open(io.BytesIO(data))
        return True
    except (OSError, SyntaxError, ValueError):
        return False


# --- Arrow: one row per segment, schema from schemas/predictions.json ---------------------------

PREDICTIONS_SCHEMA = arrow_schema("predictions")
SIGNAL_COLUMNS = ("stability", "flip_iou", "touches_border", "point_coords", "crop_box", "class_agreement")
"""Columns since versions 2 and 3 of the predictions table: an older table reads with them null."""


def predictions_to_arrow(predictions: Iterable[ImagePrediction], run_id: str, model: str) -> pa.Table:
    """A predictions table (one row per segment); images without segments have no row."""
    from pipeline.signals import touches_border

    columns: dict[str, list] = {name: [] for name in PREDICTIONS_SCHEMA.names}
    for prediction in predictions:
        for s in prediction.segments:
            for name, value in (
                ("run_id", run_id), ("model", model), ("image_id", prediction.image_id),
                ("file_name", prediction.file_name), ("height", prediction.height),
                ("width", prediction.width), ("segment_id", s.id), ("category_id", s.category_id),
                ("score", s.score), ("iscrowd", s.iscrowd), ("area", s.area), ("bbox", list(s.bbox)),
                ("rle", s.rle.counts), ("stability", s.stability), ("flip_iou", s.flip_iou),
                ("touches_border", touches_border(s.bbox, prediction.height, prediction.width)),
                ("point_coords", None if s.point_coords is None else [list(p) for p in s.point_coords]),
                ("crop_box", None if s.crop_box is None else list(s.crop_box)),
                ("class_agreement", s.class_agreement),
            ):
                columns[name].append(value)
    return pa.Table.from_pydict(columns, schema=PREDICTIONS_SCHEMA)


def predictions_from_arrow(table: pa.Table | pa.RecordBatch) -> list[ImagePrediction]:
    """Images in the order they first appear, each with its segments in row order."""
    missing = set(PREDICTIONS_SCHEMA.names) - set(table.schema.names) - set(SIGNAL_COLUMNS)
    if missing:
        raise SegpipeError(f"predictions table lacks columns {sorted(missing)}")
    col = {name: table.column(name).to_pylist() if name in table.schema.names else [None] * table.num_rows
           for name in PREDICTIONS_SCHEMA.names if name != "bbox"}
    points, crops = col["point_coords"], col["crop_box"]
    boxes = table.column("bbox")
    boxes = boxes.combine_chunks() if isinstance(boxes, pa.ChunkedArray) else boxes
    boxes = boxes.flatten().to_numpy(zero_copy_only=False).reshape(-1, 4)
    by_image: dict[int, tuple[tuple, list[Segment]]] = {}
    for i, image_id in enumerate(col["image_id"]):
        height, width = col["height"][i], col["width"][i]
        segment = Segment(
            col["segment_id"][i], col["category_id"][i], Rle(col["rle"][i], height, width),
            col["area"][i], tuple(float(v) for v in boxes[i]), col["score"][i], col["iscrowd"][i],
            col["stability"][i], col["flip_iou"][i],
            None if points[i] is None else tuple(tuple(p) for p in points[i]),
            None if crops[i] is None else tuple(crops[i]), col["class_agreement"][i],
        )
        header = (col["file_name"][i], height, width)
        by_image.setdefault(image_id, (header, []))[1].append(segment)
    return [ImagePrediction(image_id, *header, tuple(segments))
            for image_id, (header, segments) in by_image.items()]
