"""The report's inputs: ground truth and predictions as COCO files or segpipe tables, listed once, read a shard at a time."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import pyarrow as pa

from pipeline.errors import SegpipeError
from pipeline.evaluate import check_integer_ids, refuse_strays
from pipeline.io.fs import join, read_bytes, read_json, url_to_fs
from pipeline.io.tables import is_dataset_table, open_dataset_table, parquet_files, read_columns, read_rows
from pipeline.structures import ImagePrediction, Rle, Segment, decode_panoptic_png, predictions_from_arrow, rle_counts
from pipeline.validate import default_folder

TABLE = "table"  # a dataset table folder (segpipe convert): read with a pushed-down filter
ROWS = "rows"  # the predictions table (segpipe infer): Parquet files read by image-id range
PANOPTIC = "panoptic"  # a COCO panoptic JSON: its entries travel in the shard, the task reads the PNGs
INSTANCES = "instances"  # a COCO instances JSON or results file: its annotations travel in the shard


@dataclass(frozen=True, slots=True)
class Image:
    """One image of the ground truth, as its images list gives it (slots: half the memory of a dict-backed one)."""

    id: int
    file_name: str
    height: int
    width: int


@dataclass(frozen=True)
class Side:
    """Where one side's segments are (ground truth, predictions or the predictions compared with), and their form."""

    uri: str
    form: str  # TABLE, ROWS, PANOPTIC or INSTANCES
    files: tuple[str, ...] = ()  # ROWS: the Parquet files
    folder: str | None = None  # PANOPTIC: the PNG folder


@dataclass(frozen=True)
class Truth:
    """The ground truth, listed on the driver: its kind, categories, images, and for JSON the entries per image."""

    side: Side
    kind: str  # "panoptic" or "instances"
    categories: list[dict]
    coco: dict  # the file's top-level content but images and annotations (info, licenses, categories, ...)
    images: list[Image]  # in image-id order
    entries: dict | None  # JSON: image id -> panoptic annotation or list of annotations; None for a table
    raw: dict | None = None  # JSON: the parsed file, for whole-file checks (the report drops it once the shards are laid out)


@dataclass(frozen=True)
class Predictions:
    """A prediction set, listed on the driver: where it is, and for JSON the entries per image."""

    side: Side
    entries: dict | None


def open_truth(uri: str) -> Truth:
    """A COCO panoptic or instances JSON, or a dataset table, listed (images, categories, JSON entries)."""
    if is_dataset_table(uri):
        table = open_dataset_table(uri)
        rows = table.images(["image_id", "file_name", "height", "width"]).to_pydict()
        images = [Image(*values) for values in zip(rows["image_id"], rows["file_name"], rows["height"], rows["width"])]
        return Truth(Side(uri, TABLE), table.kind, _things_marked(table.categories), table.coco, images, None)
    data = read_json(uri)
    if not isinstance(data, dict) or not all(isinstance(data.get(k), list) for k in ("images", "annotations", "categories")):
        raise SegpipeError(f"{uri}: not a COCO file (needs 'images', 'annotations', 'categories')")
    if not data["images"]:
        raise SegpipeError(f"{uri}: lists no images")
    check_integer_ids([im.get("id") for im in data["images"]], uri)
    images = sorted((Image(im["id"], im["file_name"], im["height"], im["width"]) for im in data["images"]),
                    key=lambda im: im.id)
    coco = {k: v for k, v in data.items() if k not in ("images", "annotations")}
    panoptic = bool(data["annotations"]) and "segments_info" in data["annotations"][0]
    entries = _entries(data["annotations"], panoptic)
    refuse_strays(entries, [im.id for im in images], uri, "an annotation")
    side = Side(uri, PANOPTIC, folder=default_folder(uri)) if panoptic else Side(uri, INSTANCES)
    return Truth(side, "panoptic" if panoptic else "instances", _things_marked(data["categories"]), coco, images, entries,
                 data)


def _things_marked(categories: list[dict]) -> list[dict]:
    """Instance categories carry no `isthing`: every one is a thing."""
    return [{**c, "isthing": c.get("isthing", 1)} for c in categories]


def _entries(annotations: list, panoptic: bool) -> dict:
    if panoptic:
        return {a["image_id"]: a for a in annotations}
    grouped: dict = {}
    for a in annotations:
        grouped.setdefault(a["image_id"], []).append(a)
    return grouped


def open_predictions(uri: str, truth: Truth) -> Predictions:
    """A COCO panoptic JSON (+ PNGs), a COCO results JSON, a predictions table (file or folder), a `segpipe infer`
    output folder or a dataset table; predictions of images the ground truth lacks are refused."""
    known = [im.id for im in truth.images]
    fs, path = url_to_fs(uri)
    if fs.isdir(path) and fs.isdir(join(path, "predictions")):  # a `segpipe infer` output folder
        uri = join(uri, "predictions")
    if is_dataset_table(uri):
        ids = open_dataset_table(uri).segments(columns=["image_id"]).column("image_id").to_pylist()
        refuse_strays(set(ids), known, uri, "a prediction")
        return Predictions(Side(uri, TABLE), None)
    files = tuple(parquet_files(uri))
    if files:
        ids = pa.concat_tables([read_columns(f, ["image_id"]) for f in files]).column("image_id").to_pylist()
        refuse_strays(set(ids), known, uri, "a prediction")
        return Predictions(Side(uri, ROWS, files), None)
    data = read_json(uri)
    if isinstance(data, list):  # a COCO results file
        entries = _entries(data, panoptic=False)
        side = Side(uri, INSTANCES)
    elif isinstance(data, dict) and isinstance(data.get("annotations"), list):
        panoptic = bool(data["annotations"]) and "segments_info" in data["annotations"][0]
        entries = _entries(data["annotations"], panoptic)
        side = Side(uri, PANOPTIC, folder=default_folder(uri)) if panoptic else Side(uri, INSTANCES)
    else:
        raise SegpipeError(f"{uri}: not COCO predictions (a results list, or a file with an 'annotations' list)")
    refuse_strays(entries, known, uri, "a prediction")
    return Predictions(side, entries)


def read_side(side: Side, images: Sequence[Image], entries: Sequence | None,
              truth: bool = False) -> list[ImagePrediction]:
    """The segments of `images` (one ImagePrediction each, in their order; none where the side has no segment).

    A ground-truth annotation whose mask cannot be decoded is left out here (the health section names it, as
    broken_mask); in predictions it is an error."""
    if side.form == PANOPTIC:
        return [_panoptic_image(side, image, entry) for image, entry in zip(images, entries)]
    if side.form == INSTANCES:
        read = [[_instance(a, k, image, strict=not truth) for k, a in enumerate(entry or ())]
                for image, entry in zip(images, entries)]
        return [ImagePrediction(image.id, image.file_name, image.height, image.width,
                                tuple(s for s in segments if s is not None)) for image, segments in zip(images, read)]
    ids = [image.id for image in images]
    if side.form == ROWS:
        found = {p.image_id: p for p in predictions_from_arrow(read_rows(side.files, ids[0], ids[-1], _ROW_COLUMNS))}
    else:
        found = _table_images(open_dataset_table(side.uri).segments(ids, _TABLE_COLUMNS))
    return [_fitted(found.get(image.id), image, side) for image in images]


_TABLE_COLUMNS = ["image_id", "height", "width", "segment_id", "category_id", "iscrowd", "area", "bbox", "rle"]
_ROW_COLUMNS = None  # every column: predictions_from_arrow reads the signals too


def _table_images(rows: pa.Table) -> dict[int, ImagePrediction]:
    columns = {name: rows.column(name).to_pylist() for name in _TABLE_COLUMNS if name != "bbox"}
    boxes = rows.column("bbox").combine_chunks().flatten().to_numpy(zero_copy_only=False).reshape(-1, 4)
    grouped: dict[int, list[Segment]] = {}
    for i, image_id in enumerate(columns["image_id"]):
        height, width = columns["height"][i], columns["width"][i]
        grouped.setdefault(image_id, []).append(Segment(
            columns["segment_id"][i], columns["category_id"][i], Rle(columns["rle"][i], height, width),
            int(columns["area"][i]), tuple(float(v) for v in boxes[i]), 1.0, bool(columns["iscrowd"][i])))
    return {image_id: ImagePrediction(image_id, "", segments[0].rle.height, segments[0].rle.width, tuple(segments))
            for image_id, segments in grouped.items()}


def _fitted(found: ImagePrediction | None, image: Image, side: Side) -> ImagePrediction:
    """The image's segments under the ground truth's name and size; a size that differs is bad input."""
    if found is None:
        return ImagePrediction(image.id, image.file_name, image.height, image.width)
    if (found.height, found.width) != (image.height, image.width):
        raise SegpipeError(f"{side.uri}: image {image.id}: segments are {found.height}x{found.width} (HxW), the ground "
                           f"truth's image is {image.height}x{image.width}")
    return ImagePrediction(image.id, image.file_name, image.height, image.width, found.segments)


def _panoptic_image(side: Side, image: Image, entry: dict | None) -> ImagePrediction:
    if entry is None:
        return ImagePrediction(image.id, image.file_name, image.height, image.width)
    where = join(side.folder, entry["file_name"])
    ids = decode_panoptic_png(read_bytes(where), where)
    if ids.shape != (image.height, image.width):
        raise SegpipeError(f"{where}: is {ids.shape[0]}x{ids.shape[1]} (HxW), the ground truth's image {image.id} is "
                           f"{image.height}x{image.width}")
    found = ImagePrediction.from_panoptic(image.id, image.file_name, ids, entry.get("segments_info", []))
    # panopticapi takes the ground truth's areas from the JSON; a prediction's from its pixels
    stated = [s.get("area") for s in entry.get("segments_info", [])]
    segments = tuple(s if area is None else Segment(s.id, s.category_id, s.rle, int(area), s.bbox, s.score, s.iscrowd)
                     for s, area in zip(found.segments, stated))
    return ImagePrediction(image.id, image.file_name, image.height, image.width, segments)


def _instance(annotation: dict, position: int, image: Image, strict: bool = True) -> Segment | None:
    """A COCO annotation or result as a segment; area and box from the file where it gives them (as COCO does).
    A mask that does not decode to the image's pixels: an error, or None when not `strict`."""
    try:
        segmentation = annotation["segmentation"]
        rle = Rle.from_coco(segmentation, image.height, image.width)
        if isinstance(segmentation, dict):  # an RLE, compressed or not, comes as written; polygons are rasterised
            runs = rle_counts(rle.counts)
            if sum(runs) != image.height * image.width or min(runs, default=0) < 0:
                raise ValueError(f"its runs cover {sum(runs)} pixels, the image has {image.height * image.width}")
    except (KeyError, TypeError, ValueError) as error:
        if not strict:
            return None
        raise SegpipeError(f"image {image.id}: annotation {annotation.get('id', position)}: no readable "
                           f"segmentation ({error})") from None
    area = annotation.get("area")
    box = annotation.get("bbox")
    return Segment(annotation.get("id", position + 1), annotation["category_id"], rle,
                   rle.area() if area is None else int(np.rint(area)),
                   rle.bbox() if not box or len(box) != 4 else tuple(float(v) for v in box),
                   float(annotation.get("score", 1.0)), bool(annotation.get("iscrowd", 0)))
