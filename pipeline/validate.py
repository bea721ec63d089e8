"""`segpipe validate`: find what real COCO instance and panoptic files get wrong, one line per problem."""

from __future__ import annotations

import math
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass

import numpy as np
from PIL import Image
from pycocotools import mask as mask_utils

from pipeline.errors import SegpipeError
from pipeline.evaluate.match import Labelling, measure
from pipeline.io.fs import join, read_bytes, read_json, url_to_fs
from pipeline.structures import MAX_SEGMENT_ID, decode_panoptic_png, rle_counts


@dataclass(frozen=True)
class Problem:
    """One thing wrong, and where: file, image id, segment (panoptic) or annotation (instances) id."""

    file: str
    message: str
    image_id: object = None
    segment_id: object = None
    segment_word: str = "segment"

    def __str__(self) -> str:
        where = [self.file]
        if self.image_id is not None:
            where.append(f"image {self.image_id}")
        if self.segment_id is not None:
            where.append(f"{self.segment_word} {self.segment_id}")
        return ": ".join([*where, self.message])


@dataclass(frozen=True)
class Report:
    kind: str  # "instances" or "panoptic"
    images: int
    annotations: int
    problems: list[Problem]
    checked_files: str  # which folder's files were opened, for the summary


def default_folder(json_uri: str) -> str:
    """panopticapi's convention: the PNG folder is the JSON path without `.json`."""
    return json_uri[: -len(".json")] if json_uri.endswith(".json") else json_uri


def _is_int(value: object) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _is_number(value: object) -> bool:
    return (isinstance(value, (int, float)) and not isinstance(value, bool)) and math.isfinite(value)


def _escapes(file_name: str) -> bool:
    """True when a file name is absolute or climbs out of its folder."""
    parts = file_name.replace("\\", "/").split("/")
    return file_name.startswith(("/", "\\")) or ".." in parts or (len(file_name) > 1 and file_name[1] == ":")


def validate(json_uri: str, folder: str | None = None, images_folder: str | None = None) -> Report:
    """Check a COCO instances or panoptic file (the kind is recognised from its content).

    `folder` is the panoptic PNG folder (default: the JSON path without `.json`). `images_folder`,
    when given, is opened to check that image sizes agree with the JSON.
    """
    data, kind = read_coco(json_uri)
    problems = list(_check_images(json_uri, data["images"]))
    images = {im["id"]: im for im in data["images"] if isinstance(im, dict) and _is_int(im.get("id"))}
    categories, category_problems = _check_categories(json_uri, data["categories"], kind)
    problems += category_problems
    if kind == "panoptic":
        folder = folder or default_folder(json_uri)
        fs, folder_path = url_to_fs(folder)
        if not fs.isdir(folder_path):
            raise SegpipeError(f"{folder}: no such folder; the panoptic PNGs of {json_uri} belong there "
                               "(or name their folder with --dir)")
        problems += _check_panoptic(json_uri, data["annotations"], images, categories, folder)
        checked = folder
    else:
        problems += _check_instances(json_uri, data["annotations"], images, categories)
        checked = "no image files opened (give --images to check image sizes)"
    if images_folder is not None:
        problems += _check_image_files(json_uri, images, images_folder)
        checked = f"{checked}; {images_folder}" if kind == "panoptic" else images_folder
    return Report(kind, len(data["images"]), len(data["annotations"]), problems, checked)


def read_coco(json_uri: str) -> tuple[dict, str]:
    """A COCO file's content and its kind, "instances" or "panoptic" (recognised from the content)."""
    data = read_json(json_uri)
    if not isinstance(data, dict) or not isinstance(data.get("annotations"), list):
        raise SegpipeError(f"{json_uri}: not a COCO file (no 'annotations' list at the top level)")
    for key in ("images", "categories"):
        if not isinstance(data.get(key), list):
            raise SegpipeError(f"{json_uri}: not a COCO file (no '{key}' list at the top level)")
    return data, _recognise(data)


def _recognise(data: dict) -> str:
    first = next((a for a in data["annotations"] if isinstance(a, dict)), None)
    if first is not None:
        return "panoptic" if "segments_info" in first else "instances"
    return "panoptic" if any(isinstance(c, dict) and "isthing" in c for c in data["categories"]) else "instances"


def _check_images(file: str, images: list) -> Iterator[Problem]:
    seen: Counter = Counter()
    for position, image in enumerate(images):
        if not isinstance(image, dict) or not _is_int(image.get("id")):
            yield Problem(file, f"images[{position}] has no integer 'id'")
            continue
        image_id = image["id"]
        seen[image_id] += 1
        if seen[image_id] == 2:
            yield Problem(file, "duplicate image id", image_id)
        name = image.get("file_name")
        if not isinstance(name, str) or not name:
            yield Problem(file, "no 'file_name'", image_id)
        elif _escapes(name):
            yield Problem(file, f"file_name {name!r} escapes its folder", image_id)
        for key in ("height", "width"):
            if not _is_int(image.get(key)) or image[key] <= 0:
                yield Problem(file, f"'{key}' is {image.get(key)!r}, expected a positive integer", image_id)


def _check_categories(file: str, categories: list, kind: str) -> tuple[dict, list[Problem]]:
    problems, by_id = [], {}
    for position, category in enumerate(categories):
        if not isinstance(category, dict) or not _is_int(category.get("id")):
            problems.append(Problem(file, f"categories[{position}] has no integer 'id'"))
            continue
        if category["id"] in by_id:
            problems.append(Problem(file, f"duplicate category id {category['id']}"))
        if kind == "panoptic" and category.get("isthing") not in (0, 1):
            problems.append(Problem(file, f"category {category['id']} has 'isthing' {category.get('isthing')!r}, expected 0 or 1"))
        by_id[category["id"]] = category
    return by_id, problems


def _image_size(images: dict, image_id: object) -> tuple[int, int] | None:
    image = images.get(image_id)
    if image is None or not all(_is_int(image.get(k)) and image[k] > 0 for k in ("height", "width")):
        return None  # reported with the image; its annotations are checked without the size
    return image["height"], image["width"]


# --- COCO instances ---------------------------------------------------------------------------


def _check_instances(file: str, annotations: list, images: dict, categories: dict) -> Iterator[Problem]:
    seen: Counter = Counter()
    for position, ann in enumerate(annotations):
        if not isinstance(ann, dict):
            yield Problem(file, f"annotations[{position}] is not an object")
            continue
        ann_id = ann.get("id", f"#{position}")
        image_id = ann.get("image_id")

        def problem(message: str) -> Problem:
            return Problem(file, message, image_id, ann_id, "annotation")

        if not _is_int(ann.get("id")):
            yield problem("no integer 'id'")
        else:
            seen[ann_id] += 1
            if seen[ann_id] == 2:
                yield problem("duplicate annotation id")
        if image_id not in images:
            yield problem("image_id is not in 'images'")
        if ann.get("category_id") not in categories:
            yield problem(f"unknown category_id {ann.get('category_id')!r}")
        if ann.get("iscrowd") not in (0, 1):
            yield problem(f"'iscrowd' is {ann.get('iscrowd')!r}, expected 0 or 1")
        size = _image_size(images, image_id)
        segmentation = ann.get("segmentation")
        if segmentation is None:  # a detection-only dataset: the box is all there is to check
            yield from (problem(m) for m in _measure_problems(ann, None, None))
            continue
        error, rle, polygons = _decode_segmentation(segmentation, size)
        if error:
            yield problem(error)
            continue
        yield from (problem(m) for m in _measure_problems(ann, rle, polygons))


def _decode_segmentation(segmentation: object, size: tuple[int, int] | None):
    """(error, rle, polygons): an error message, or the segmentation as pycocotools RLE."""
    if isinstance(segmentation, list):
        if not segmentation:
            return "empty polygon list", None, None
        for polygon in segmentation:
            if not isinstance(polygon, list) or not all(_is_number(v) for v in polygon):
                return "malformed polygon: expected lists of numbers", None, None
            if len(polygon) < 6 or len(polygon) % 2:
                return f"malformed polygon: {len(polygon)} coordinates, expected an even number of at least 6", None, None
        if size is None:
            return None, None, segmentation
        return None, mask_utils.merge(mask_utils.frPyObjects(segmentation, *size)), segmentation
    if not isinstance(segmentation, dict) or "counts" not in segmentation or "size" not in segmentation:
        return "malformed segmentation: expected polygons or an RLE with 'size' and 'counts'", None, None
    rle_size = segmentation["size"]
    if not (isinstance(rle_size, list) and len(rle_size) == 2 and all(_is_int(v) and v >= 0 for v in rle_size)):
        return f"malformed RLE: size {rle_size!r}", None, None
    if size is not None and tuple(rle_size) != size:
        return f"RLE size {rle_size} differs from the image size [{size[0]}, {size[1]}]", None, None
    counts = segmentation["counts"]
    total = rle_size[0] * rle_size[1]
    if isinstance(counts, list):
        if not all(_is_int(c) and c >= 0 for c in counts):
            return "malformed RLE: counts must be non-negative integers", None, None
        if sum(counts) != total:
            return f"malformed RLE: counts add up to {sum(counts)}, expected {total} pixels", None, None
        return None, mask_utils.frPyObjects(segmentation, *rle_size), None
    if not isinstance(counts, str):
        return "malformed RLE: counts must be a string or a list of integers", None, None
    try:
        runs = rle_counts(counts)
    except ValueError as error:
        return f"malformed RLE: {error}", None, None
    if sum(runs) != total:
        return f"malformed RLE: runs add up to {sum(runs)}, expected {total} pixels", None, None
    return None, {"size": rle_size, "counts": counts.encode("ascii")}, None


def _shoelace(polygons: list[list[float]]) -> float:
    total = 0.0
    for polygon in polygons:
        x, y = np.asarray(polygon[0::2]), np.asarray(polygon[1::2])
        total += 0.5 * abs(float(np.dot(x, np.roll(y, -1)) - np.dot(y, np.roll(x, -1))))
    return total


def _measure_problems(ann: dict, rle: dict | None, polygons: list | None) -> Iterator[str]:
    """area and bbox against the pixels: exact for RLE; for polygons within rounding.

    COCO's own polygon annotations carry areas and boxes measured on the polygon (shoelace area,
    vertex extents), which differ from the rasterised pixels by a fraction of the outline.
    """
    area, bbox = ann.get("area"), ann.get("bbox")
    if not _is_number(area) or area < 0:
        yield f"'area' is {area!r}, expected a non-negative number"
    if not (isinstance(bbox, list) and len(bbox) == 4 and all(_is_number(v) for v in bbox)) or (
            bbox[2] < 0 or bbox[3] < 0):
        yield f"'bbox' is {bbox!r}, expected [x, y, width, height] with width, height >= 0"
        bbox = None
    if rle is None:
        return
    pixels = int(mask_utils.area(rle))
    pixel_box = [float(v) for v in mask_utils.toBbox(rle)]
    if polygons is None:
        if _is_number(area) and area != pixels:
            yield f"area {area} disagrees with the mask's {pixels} pixels"
        if bbox is not None and any(abs(a - b) > 1e-6 for a, b in zip(bbox, pixel_box)):
            yield f"bbox {bbox} disagrees with the mask's box {pixel_box}"
        return
    if _is_number(area):
        shoelace = _shoelace(polygons)
        if abs(area - shoelace) > max(1.0, 0.01 * shoelace) and abs(area - pixels) > max(2.0, 0.1 * pixels):
            yield f"area {area} disagrees with the polygons ({pixels} pixels, polygon area {shoelace:.2f})"
    if bbox is not None:
        xs = [v for p in polygons for v in p[0::2]]
        ys = [v for p in polygons for v in p[1::2]]
        extent = [min(xs), min(ys), max(xs) - min(xs), max(ys) - min(ys)]
        if any(abs(a - b) > 1.0 for a, b in zip(bbox, extent)) and any(abs(a - b) > 1.0 for a, b in zip(bbox, pixel_box)):
            yield f"bbox {bbox} disagrees with the polygons' box {[round(v, 2) for v in extent]}"


# --- COCO panoptic ----------------------------------------------------------------------------


def _check_panoptic(file: str, annotations: list, images: dict, categories: dict, folder: str) -> Iterator[Problem]:
    annotated: Counter = Counter()
    for position, ann in enumerate(annotations):
        if not isinstance(ann, dict):
            yield Problem(file, f"annotations[{position}] is not an object")
            continue
        image_id = ann.get("image_id")
        annotated[image_id] += 1
        if image_id not in images:
            yield Problem(file, "annotation's image_id is not in 'images'", image_id)
        elif annotated[image_id] == 2:
            yield Problem(file, "image has more than one annotation", image_id)
        segments = ann.get("segments_info")
        if not isinstance(segments, list) or not all(isinstance(s, dict) for s in segments):
            yield Problem(file, "'segments_info' is not a list of objects", image_id)
            continue
        yield from _check_segments_info(file, image_id, segments, categories)
        name = ann.get("file_name")
        if not isinstance(name, str) or not name:
            yield Problem(file, "annotation has no 'file_name'", image_id)
        elif _escapes(name):
            yield Problem(file, f"file_name {name!r} escapes its folder", image_id)
        else:
            yield from _check_png(file, join(folder, name), image_id, segments, _image_size(images, image_id))
    for image_id in images:
        if annotated[image_id] == 0:
            yield Problem(file, "image has no panoptic annotation", image_id)


def _check_segments_info(file: str, image_id: object, segments: list, categories: dict) -> Iterator[Problem]:
    seen: Counter = Counter()
    for segment in segments:
        segment_id = segment.get("id")
        if not _is_int(segment_id) or not 0 < segment_id <= MAX_SEGMENT_ID:
            yield Problem(file, f"segment id {segment_id!r} is not in 1..{MAX_SEGMENT_ID} (0 is VOID)", image_id)
            continue
        seen[segment_id] += 1
        if seen[segment_id] == 2:
            yield Problem(file, "duplicate segment id", image_id, segment_id)
        if segment.get("category_id") not in categories:
            yield Problem(file, f"unknown category_id {segment.get('category_id')!r}", image_id, segment_id)
        if segment.get("iscrowd", 0) not in (0, 1):
            yield Problem(file, f"'iscrowd' is {segment.get('iscrowd')!r}, expected 0 or 1", image_id, segment_id)


def _check_png(file: str, png_uri: str, image_id: object, segments: list,
               size: tuple[int, int] | None) -> Iterator[Problem]:
    try:
        ids = decode_panoptic_png(read_bytes(png_uri), png_uri)
    except SegpipeError as error:
        yield Problem(file, str(error), image_id)
        return
    if size is not None and ids.shape != size:
        yield Problem(file, f"{png_uri}: PNG is {ids.shape[0]}x{ids.shape[1]} (HxW), the image is {size[0]}x{size[1]}", image_id)
    present, counts = np.unique(ids, return_counts=True)
    pixel_area = dict(zip(present.tolist(), counts.tolist()))
    declared = {s.get("id") for s in segments}
    for segment_id in present.tolist():
        if segment_id != 0 and segment_id not in declared:
            yield Problem(file, f"segment in the PNG is not in segments_info ({pixel_area[segment_id]} pixels)", image_id, segment_id)
    position = {}  # each valid id once (a duplicate is reported elsewhere and measured as its first)
    for s in segments:
        if _is_int(s.get("id")) and s["id"] > 0:
            position.setdefault(s["id"], len(position))
    # Areas and boxes from the matcher's intervals, as the evaluators see the segments.
    areas, boxes = measure(Labelling.from_id_maps([ids], [list(position)]), len(position), [ids.shape[0]])
    for segment in segments:
        segment_id = segment.get("id")
        if not _is_int(segment_id) or segment_id <= 0:
            continue
        k = position[segment_id]
        if not areas[k]:
            yield Problem(file, "segment in segments_info has no pixels in the PNG", image_id, segment_id)
            continue
        area, bbox = segment.get("area"), segment.get("bbox")
        if area != areas[k]:
            yield Problem(file, f"area {area!r} disagrees with the PNG's {areas[k]} pixels", image_id, segment_id)
        pixel_box = boxes[k].tolist()
        if not (isinstance(bbox, list) and len(bbox) == 4 and all(_is_number(v) for v in bbox)) or list(bbox) != pixel_box:
            yield Problem(file, f"bbox {bbox!r} disagrees with the PNG's box {pixel_box}", image_id, segment_id)


def _check_image_files(file: str, images: dict, folder: str) -> Iterator[Problem]:
    fs, root = url_to_fs(folder)
    for image_id, image in images.items():
        name = image.get("file_name")
        if not isinstance(name, str) or not name or _escapes(name):
            continue  # already reported
        uri = join(folder, name)
        try:
            with fs.open(join(root, name), "rb") as f, Image.open(f) as opened:  # reads the header only
                width, height = opened.size
        except FileNotFoundError:
            yield Problem(file, f"{uri}: no such file", image_id)
            continue
        except (OSError, SyntaxError, ValueError) as error:
            yield Problem(file, f"{uri}: cannot be read as an image ({error})", image_id)
            continue
        if (height, width) != _image_size(images, image_id):
            yield Problem(file, f"{uri}: image is {height}x{width} (HxW), the JSON says "
                                f"{image.get('height')}x{image.get('width')}", image_id)
