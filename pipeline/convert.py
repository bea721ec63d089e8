"""`segpipe convert`: COCO instances or panoptic files to dataset tables and back, SA-1B folders to predictions and back, exactly."""

from __future__ import annotations

import json
from collections.abc import Iterator
from dataclasses import dataclass

import numpy as np
import pyarrow as pa

from pipeline.errors import SegpipeError
from pipeline.io.fs import absolute, join, read_bytes, url_to_fs, write_bytes, write_json
from pipeline.io.tables import DatasetTable, is_dataset_table, open_dataset_table, write_dataset_table
from pipeline.schemas import arrow_schema
from pipeline.structures import (
    MAX_SEGMENT_ID, ImagePrediction, Rle, Segment, decode_panoptic_png, encode_panoptic_png, rle_counts,
)
from pipeline.validate import _is_int, _is_number, default_folder, read_coco

IMAGE_KEYS = ("id", "file_name", "height", "width")
SEGMENT_KEYS = ("id", "category_id", "iscrowd", "area", "bbox")  # shared by annotations and segments_info
INSTANCE_KEYS = (*SEGMENT_KEYS, "image_id", "segmentation")
PANOPTIC_KEYS = ("image_id", "file_name", "segments_info")
EXPORT_IMAGES = 1000  # images whose segments one export step reads and renders


@dataclass(frozen=True)
class Converted:
    """What a conversion wrote."""

    out: str
    kind: str  # "instances", "panoptic", "predictions" or "sa1b"
    images: int
    segments: int


def convert(src: str, out: str, png_dir: str | None = None, images_dir: str | None = None,
            row_group_images: int = 500, gt: str | None = None) -> Converted:
    """A COCO file to a dataset table folder, or a dataset table folder to a COCO file; a folder of SA-1B files
    to a predictions folder (the `segpipe infer` layout, images at `images_dir`, default SRC), or a predictions
    folder to SA-1B files (the direction from SRC); with `gt`, SRC is a COCO results file and OUT its predictions table."""
    from pipeline.io import sa1b

    if gt is not None:
        return results_to_predictions(src, gt, out, row_group_images)
    if is_dataset_table(src):
        return table_to_coco(src, out, png_dir)
    if _is_predictions_folder(src):
        return Converted(out, "sa1b", *sa1b.write_folder(src, out))
    if sa1b.is_sa1b_folder(src):
        return Converted(out, "predictions", *sa1b.read_folder(src, out, images_dir, row_group_images))
    return coco_to_table(src, out, png_dir, images_dir, row_group_images)


def _is_predictions_folder(uri: str) -> bool:
    """A `segpipe infer` (or filter, classify, SA-1B convert) output: run.json beside predictions/."""
    fs, path = url_to_fs(uri)
    return fs.isfile(join(path, "run.json")) and fs.isdir(join(path, "predictions"))


# --- COCO -> table ----------------------------------------------------------------------------


def coco_to_table(src: str, out: str, png_dir: str | None = None, images_dir: str | None = None,
                  row_group_images: int = 500) -> Converted:
    """A COCO instances or panoptic file (+ PNG folder, default SRC without .json) as a dataset table at OUT.

    Rows are written in image-id order, a row group per `row_group_images` images; each row keeps its
    position in the file, so export restores the file's order of images, annotations and segments.
    """
    data, kind = read_coco(src)
    images = _images_by_id(src, data["images"])
    if kind == "panoptic":
        panoptic, folder = _panoptic_by_image(src, data["annotations"], images), png_dir or default_folder(src)

        def rows_of(image_id: int) -> tuple[dict, list[dict]]:
            return _panoptic_rows(src, folder, images[image_id], panoptic.get(image_id))
    else:
        instances = _instances_by_image(src, data["annotations"], images)

        def rows_of(image_id: int) -> tuple[dict, list[dict]]:
            return _instance_rows(src, images[image_id], instances.get(image_id, []))
    ids = sorted(images)
    chunks = (_chunk(src, [rows_of(i) for i in ids[start:start + row_group_images]], images_dir)
              for start in range(0, len(ids), row_group_images))
    coco = {key: value for key, value in data.items() if key not in ("images", "annotations")}
    n_images, n_segments = write_dataset_table(out, kind, coco, chunks)
    return Converted(out, kind, n_images, n_segments)


def _images_by_id(src: str, images: list) -> dict[int, tuple[int, dict]]:
    """Image id -> (position in 'images', the image); malformed and duplicate images are errors."""
    by_id: dict[int, tuple[int, dict]] = {}
    for position, image in enumerate(images):
        if not isinstance(image, dict) or not _is_int(image.get("id")):
            raise SegpipeError(f"{src}: images[{position}] has no integer 'id'")
        where = f"{src}: image {image['id']}"
        if image["id"] in by_id:
            raise SegpipeError(f"{where}: duplicate image id")
        if not isinstance(image.get("file_name"), str):
            raise SegpipeError(f"{where}: no 'file_name'")
        for key in ("height", "width"):
            if not _is_int(image.get(key)) or image[key] <= 0:
                raise SegpipeError(f"{where}: '{key}' is {image.get(key)!r}, expected a positive integer")
        by_id[image["id"]] = (position, image)
    return by_id


def _instances_by_image(src: str, annotations: list, images: dict) -> dict[int, list[tuple[int, dict]]]:
    """Image id -> [(position in 'annotations', annotation)] in file order; unknown images, duplicate ids are errors."""
    by_image: dict[int, list[tuple[int, dict]]] = {}
    seen: set[int] = set()
    for position, ann in enumerate(annotations):
        if not isinstance(ann, dict) or not _is_int(ann.get("id")):
            raise SegpipeError(f"{src}: annotations[{position}] is not an object with an integer 'id'")
        where = f"{src}: image {ann.get('image_id')!r}: annotation {ann['id']}"
        if ann["id"] in seen:
            raise SegpipeError(f"{where}: duplicate annotation id")
        if not _is_int(ann.get("image_id")) or ann["image_id"] not in images:
            raise SegpipeError(f"{where}: image_id is not in 'images'")
        seen.add(ann["id"])
        by_image.setdefault(ann["image_id"], []).append((position, ann))
    return by_image


def _panoptic_by_image(src: str, annotations: list, images: dict) -> dict[int, tuple[int, dict]]:
    """Image id -> (position in 'annotations', annotation); one annotation per image, for an image in 'images'."""
    by_image: dict[int, tuple[int, dict]] = {}
    for position, ann in enumerate(annotations):
        if not isinstance(ann, dict):
            raise SegpipeError(f"{src}: annotations[{position}] is not an object")
        where = f"{src}: image {ann.get('image_id')!r}"
        if not _is_int(ann.get("image_id")) or ann["image_id"] not in images:
            raise SegpipeError(f"{where}: annotation's image_id is not in 'images'")
        if ann["image_id"] in by_image:
            raise SegpipeError(f"{where}: image has more than one annotation")
        if not isinstance(ann.get("file_name"), str) or not isinstance(ann.get("segments_info"), list):
            raise SegpipeError(f"{where}: annotation needs a 'file_name' and a 'segments_info' list")
        by_image[ann["image_id"]] = (position, ann)
    return by_image


def _extra(item: dict, known: tuple[str, ...]) -> str | None:
    """The keys no column holds, as JSON; None when there are none."""
    rest = {key: value for key, value in item.items() if key not in known}
    return json.dumps(rest, separators=(",", ":")) if rest else None


def _measures(where: str, item: dict) -> dict:
    """The columns an annotation and a segments_info entry share; int_bits records which numbers were ints."""
    for key in ("id", "category_id"):
        if not _is_int(item.get(key)):
            raise SegpipeError(f"{where}: '{key}' is {item.get(key)!r}, expected an integer")
    if not _is_int(item.get("iscrowd")) or item["iscrowd"] not in (0, 1):
        raise SegpipeError(f"{where}: 'iscrowd' is {item.get('iscrowd')!r}, expected 0 or 1")
    area, bbox = item.get("area"), item.get("bbox")
    if not _is_number(area):
        raise SegpipeError(f"{where}: 'area' is {area!r}, expected a number")
    if not (isinstance(bbox, list) and len(bbox) == 4 and all(_is_number(v) for v in bbox)):
        raise SegpipeError(f"{where}: 'bbox' is {bbox!r}, expected 4 numbers")
    if any(float(v) != v for v in (area, *bbox)):  # an integer past 2^53 would come back changed
        raise SegpipeError(f"{where}: area or bbox holds an integer too large for float64")
    return {"segment_id": item["id"], "category_id": item["category_id"], "iscrowd": bool(item["iscrowd"]),
            "area": float(area), "bbox": [float(v) for v in bbox],
            "int_bits": sum(1 << bit for bit, v in enumerate([area, *bbox]) if isinstance(v, int))}


def _form(segmentation: object) -> str:
    """How the file wrote a segmentation (see schemas/segments.json); 'json' when no typed column keeps it exactly."""
    if isinstance(segmentation, list):
        if not segmentation:
            return "empty"
        if all(isinstance(p, list) for p in segmentation):
            types = {type(v) for p in segmentation for v in p}
            if types == {float}:
                return "polygons"
            if types == {int}:
                return "polygons_int"
        return "json"
    if isinstance(segmentation, dict) and segmentation.keys() == {"size", "counts"}:
        size, counts = segmentation["size"], segmentation["counts"]
        if isinstance(size, list) and len(size) == 2 and all(type(v) is int for v in size):
            if isinstance(counts, str):
                return "rle"
            if isinstance(counts, list) and all(type(c) is int for c in counts):
                return "rle_list"
    return "json"


def _instance_rows(src: str, image_entry: tuple[int, dict], annotations: list[tuple[int, dict]]) -> tuple[dict, list[dict]]:
    """The image row and its annotations' rows."""
    position, image = image_entry
    rows = []
    for ann_position, ann in annotations:
        where = f"{src}: image {image['id']}: annotation {ann['id']}"
        row = {"image_id": image["id"], "position": ann_position, **_measures(where, ann)}
        extra = {key: value for key, value in ann.items() if key not in INSTANCE_KEYS}
        if "segmentation" not in ann:
            row.update(height=image["height"], width=image["width"], rle=None, polygons=None, form="absent")
        else:
            segmentation = ann["segmentation"]
            rle, form = _rasterise(where, segmentation, image["height"], image["width"]), _form(segmentation)
            if form == "rle_list" and rle_counts(rle.counts) != segmentation["counts"]:
                form = "json"  # counts pycocotools does not keep as given (e.g. past 2^32): kept verbatim
            if form == "json":
                extra["segmentation"] = segmentation
            polygons = segmentation if form.startswith("polygons") else None
            row.update(height=rle.height, width=rle.width, rle=rle.counts, polygons=polygons, form=form)
        row["extra"] = json.dumps(extra, separators=(",", ":")) if extra else None
        rows.append(row)
    return _image_row(position, image), rows


def _rasterise(where: str, segmentation: object, height: int, width: int) -> Rle:
    """The mask as pycocotools' annToRLE reads it (polygons at the image size, RLE at its own)."""
    try:
        return Rle.from_coco(segmentation, height, width)
    except Exception as error:  # pycocotools raises bare Exceptions (and TypeErrors...) for malformed input
        raise SegpipeError(f"{where}: malformed segmentation ({type(error).__name__}: {error})") from None


def _panoptic_rows(src: str, folder: str, image_entry: tuple[int, dict],
                   annotation: tuple[int, dict] | None) -> tuple[dict, list[dict]]:
    """The image row and its segments' rows, masks from the PNG; an image without annotation has no rows."""
    position, image = image_entry
    row = _image_row(position, image)
    if annotation is None:
        return row, []
    ann_position, ann = annotation
    row.update(panoptic_file_name=ann["file_name"], panoptic_position=ann_position,
               panoptic_extra=_extra(ann, PANOPTIC_KEYS))
    where = f"{src}: image {image['id']}"
    measures = _segments_info(where, ann["segments_info"])
    ids = _read_png(where, join(folder, ann["file_name"]), image, [m["segment_id"] for m in measures])
    prediction = ImagePrediction.from_panoptic(image["id"], image["file_name"], ids, ann["segments_info"])
    rows = [{"image_id": image["id"], "position": k, "height": ids.shape[0], "width": ids.shape[1],
             **measured, "rle": segment.rle.counts, "polygons": None, "form": "png",
             "extra": _extra(info, SEGMENT_KEYS)}
            for k, (measured, segment, info) in enumerate(zip(measures, prediction.segments, ann["segments_info"]))]
    return row, rows


def _segments_info(where: str, segments_info: list) -> list[dict]:
    """Each entry's shared columns; ids must be unique panoptic ids."""
    measures, seen = [], set()
    for k, info in enumerate(segments_info):
        if not isinstance(info, dict):
            raise SegpipeError(f"{where}: segments_info[{k}] is not an object")
        measured = _measures(f"{where}: segment {info.get('id')!r}", info)
        segment_id = measured["segment_id"]
        if not 0 < segment_id <= MAX_SEGMENT_ID or segment_id in seen:
            problem = "duplicate segment id" if segment_id in seen else f"segment id outside 1..{MAX_SEGMENT_ID}"
            raise SegpipeError(f"{where}: segment {segment_id}: {problem}")
        seen.add(segment_id)
        measures.append(measured)
    return measures


def _read_png(where: str, png_uri: str, image: dict, declared: list[int]) -> np.ndarray:
    """The image's id map; every non-VOID id in it must be declared in segments_info, or its pixels would be lost."""
    try:
        ids = decode_panoptic_png(read_bytes(png_uri), png_uri)
    except SegpipeError as error:
        raise SegpipeError(f"{where}: {error}") from None
    if ids.shape != (image["height"], image["width"]):
        raise SegpipeError(f"{where}: {png_uri}: PNG is {ids.shape[0]}x{ids.shape[1]} (HxW), "
                           f"the image is {image['height']}x{image['width']}")
    present, pixels = np.unique(ids, return_counts=True)
    undeclared = (present != 0) & ~np.isin(present, declared)
    if undeclared.any():
        first = int(np.argmax(undeclared))
        raise SegpipeError(f"{where}: segment {present[first]}: {png_uri} has {pixels[first]} pixels of this id, "
                           "which segments_info lacks")
    return ids


def _image_row(position: int, image: dict) -> dict:
    return {"image_id": image["id"], "position": position, "file_name": image["file_name"],
            "height": image["height"], "width": image["width"], "panoptic_file_name": None,
            "panoptic_position": None, "panoptic_extra": None, "extra": _extra(image, IMAGE_KEYS)}


def _chunk(src: str, rows: list[tuple[dict, list[dict]]], images_dir: str | None) -> tuple[pa.Table, pa.Table]:
    """One row group's images and segments tables."""
    image_rows = [image for image, _ in rows]
    for image in image_rows:
        image["uri"] = join(absolute(images_dir), image["file_name"]) if images_dir else None
    segment_rows = [segment for _, segments in rows for segment in segments]
    try:
        return (pa.Table.from_pylist(image_rows, schema=arrow_schema("images")),
                pa.Table.from_pylist(segment_rows, schema=arrow_schema("segments")))
    except (pa.ArrowInvalid, OverflowError) as error:  # e.g. an id or size past its column's integer range
        raise SegpipeError(f"{src}: a value does not fit the table ({error})") from None


# --- COCO results -> predictions table ---------------------------------------------------------


def results_to_predictions(src: str, gt: str, out: str, row_group_images: int = 500) -> Converted:
    """A COCO results file as a predictions table folder (schemas/predictions.json), evaluated as the file is.

    Each result becomes one row; its segment id is its 1-based position in the file (results may
    overlap, so they are no panoptic segments). Rows go in image-id order, a Parquet file (one row
    group) per `row_group_images` images, and keep the file's order within an image, which is what
    COCOeval's stable sort of tied scores sees. Scores and boxes are the file's; RLE is kept as
    given; polygons and uncompressed RLE are encoded at the GT image's size; a result without a
    segmentation gets its box's polygon and one without a box its mask's box, as COCO.loadRes does.
    The table's rows always carry boxes, so AP reads them in loadRes's box branch (area = box area).
    """
    from pipeline.io.fs import read_json
    from pipeline.io.tables import write_predictions

    results, coco = read_json(src), read_json(gt)
    if not isinstance(results, list):
        raise SegpipeError(f"{src}: not a COCO results file (expected a list of detections)")
    if not isinstance(coco, dict) or not isinstance(coco.get("images"), list):
        raise SegpipeError(f"{gt}: not a COCO file (no 'images' list)")
    images = {image_id: image for image_id, (_, image) in _images_by_id(gt, coco["images"]).items()}
    by_image: dict[int, list[tuple[int, dict]]] = {}
    for position, result in enumerate(results):
        if not isinstance(result, dict) or not {"image_id", "category_id", "score"} <= result.keys():
            raise SegpipeError(f"{src}: result {position} lacks image_id, category_id or score")
        if result["image_id"] not in images:
            raise SegpipeError(f"{src}: result {position}: image {result['image_id']!r} is not in {gt}")
        by_image.setdefault(result["image_id"], []).append((position, result))
    ids = sorted(by_image)
    for part, start in enumerate(range(0, len(ids), row_group_images)):
        batch = [_result_prediction(src, images[i], by_image[i]) for i in ids[start:start + row_group_images]]
        write_predictions(join(out, f"part-{part:05d}.parquet"), batch, run_id=src, model="coco-results")
    return Converted(out, "predictions", len(ids), len(results))


def _result_prediction(src: str, image: dict, results: list[tuple[int, dict]]) -> ImagePrediction:
    """One image's results as an ImagePrediction, in file order."""
    height, width = image["height"], image["width"]
    segments = []
    for position, r in results:
        where = f"{src}: result {position} (image {image['id']})"
        if "segmentation" in r:
            rle = _rasterise(where, r["segmentation"], height, width)
        elif "bbox" in r:
            x, y, w, h = r["bbox"]
            rle = _rasterise(where, [[x, y, x, y + h, x + w, y + h, x + w, y]], height, width)
        else:
            raise SegpipeError(f"{where}: has neither 'segmentation' nor 'bbox'")
        if (rle.height, rle.width) != (height, width):
            raise SegpipeError(f"{where}: mask is {rle.height}x{rle.width} (HxW), the image {height}x{width}")
        bbox = tuple(float(v) for v in r["bbox"]) if "bbox" in r else rle.bbox()
        segments.append(Segment(position + 1, r["category_id"], rle, rle.area(), bbox, float(r["score"])))
    return ImagePrediction(image["id"], image["file_name"], height, width, tuple(segments))


# --- table -> COCO ----------------------------------------------------------------------------


def table_to_coco(src: str, out: str, png_dir: str | None = None) -> Converted:
    """A dataset table as the COCO file it came from; panoptic PNGs (rendered from the RLE rows) to PNG_DIR.

    Images, annotations and segments come back in the file's order (their stored positions); PNG_DIR
    defaults to OUT without .json.
    """
    table = open_dataset_table(src)
    images = table.images().to_pylist()
    if table.kind == "panoptic":
        annotations = _panoptic_annotations(table, images, png_dir or default_folder(out))
    else:
        annotations = [annotation for _, annotation in sorted(_instance_annotations(table.segments()))]
    coco_images = [{"id": image["image_id"], "file_name": image["file_name"], "height": image["height"],
                    "width": image["width"], **_parse(image["extra"])}
                   for image in sorted(images, key=lambda image: image["position"])]
    write_json(out, {**table.coco, "images": coco_images, "annotations": annotations})
    segments = sum(len(a["segments_info"]) for a in annotations) if table.kind == "panoptic" else len(annotations)
    return Converted(out, table.kind, len(images), segments)


def _parse(extra: str | None) -> dict:
    return json.loads(extra) if extra else {}


def _measured(row: dict) -> dict:
    """The shared keys back as the file wrote them: numbers flagged in int_bits as ints, the rest floats."""
    numbers = [int(v) if row["int_bits"] >> bit & 1 else v for bit, v in enumerate([row["area"], *row["bbox"]])]
    return {"id": row["segment_id"], "category_id": row["category_id"], "iscrowd": int(row["iscrowd"]),
            "area": numbers[0], "bbox": numbers[1:]}


def _segmentation(row: dict) -> dict:
    """{'segmentation': ...} in the form the file had; {} when absent or kept verbatim in extra."""
    form, size = row["form"], [row["height"], row["width"]]
    if form == "polygons":
        return {"segmentation": row["polygons"]}
    if form == "polygons_int":
        return {"segmentation": [[int(v) for v in polygon] for polygon in row["polygons"]]}
    if form == "rle":
        return {"segmentation": {"size": size, "counts": row["rle"]}}
    if form == "rle_list":
        return {"segmentation": {"size": size, "counts": rle_counts(row["rle"])}}
    if form == "empty":
        return {"segmentation": []}
    if form in ("absent", "json"):
        return {}
    raise SegpipeError(f"image {row['image_id']}: segment {row['segment_id']}: unknown segmentation form {form!r}")


def _instance_annotations(segments: pa.Table) -> Iterator[tuple[int, dict]]:
    """(position, annotation) per row."""
    for row in segments.to_pylist():
        yield row["position"], {**_measured(row), "image_id": row["image_id"], **_segmentation(row),
                                **_parse(row["extra"])}


def _panoptic_annotations(table: DatasetTable, images: list[dict], folder: str) -> list[dict]:
    """The annotations in the file's order, writing each image's PNG on the way (EXPORT_IMAGES images at a time)."""
    annotated = [image for image in images if image["panoptic_file_name"] is not None]
    found = []
    for start in range(0, len(annotated), EXPORT_IMAGES):
        batch = annotated[start:start + EXPORT_IMAGES]
        by_image: dict[int, list[dict]] = {}
        for row in table.segments([image["image_id"] for image in batch]).to_pylist():
            by_image.setdefault(row["image_id"], []).append(row)
        for image in batch:
            rows = sorted(by_image.get(image["image_id"], []), key=lambda row: row["position"])
            write_bytes(join(folder, image["panoptic_file_name"]), encode_panoptic_png(_render(table.uri, image, rows)))
            found.append((image["panoptic_position"], {
                "image_id": image["image_id"], "file_name": image["panoptic_file_name"],
                "segments_info": [{**_measured(row), **_parse(row["extra"])} for row in rows],
                **_parse(image["panoptic_extra"])}))
    return [annotation for _, annotation in sorted(found, key=lambda item: item[0])]


def _render(src: str, image: dict, rows: list[dict]) -> np.ndarray:
    """The id map of one image's segment rows; overlapping or mis-sized masks are errors."""
    where = f"{src}: image {image['image_id']}"
    for row in rows:
        if (row["height"], row["width"]) != (image["height"], image["width"]) or row["rle"] is None:
            raise SegpipeError(f"{where}: segment {row['segment_id']}: no mask of the image's size")
    segments = tuple(Segment.from_rle(row["segment_id"], row["category_id"], Rle(row["rle"], row["height"], row["width"]))
                     for row in rows)
    try:
        return ImagePrediction(image["image_id"], image["file_name"], image["height"], image["width"],
                               segments).to_panoptic()[0]
    except ValueError as error:
        raise SegpipeError(f"{src}: {error}") from None
