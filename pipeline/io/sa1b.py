"""SA-1B's format (one JSON per image: SAM's masks as COCO RLE with predicted IoU, stability, point and crop), read and written exactly."""

from __future__ import annotations

import hashlib
import json
import re

import pyarrow.parquet as pq

from pipeline.errors import SegpipeError
from pipeline.io.fs import absolute, is_hidden, join, read_json, url_to_fs, write_bytes, write_json
from pipeline.io.tables import parquet_files, write_predictions
from pipeline.models.outputs import OBJECT
from pipeline.structures import ImagePrediction, Rle, Segment, predictions_from_arrow, rle_counts
from pipeline.validate import _is_int, _is_number

MODEL = "sa1b"
IMAGE_KEYS = ("image_id", "file_name", "height", "width")
ANNOTATION_KEYS = ("id", "segmentation", "area", "bbox", "predicted_iou", "point_coords", "stability_score", "crop_box")
SAM_FORMS = {"area": "int", "bbox": "int", "predicted_iou": "float", "point_coords": "float",
             "stability_score": "float", "crop_box": "int"}
"""Whether each number is written as an integer or a float, as SAM's generator writes them: its boxes are
integer tensors made into lists (utils/amg.py), though its docstring calls them floats. A folder read from
SA-1B files records the forms it found (run.json's "sa1b"), so writing it back gives the same JSON."""


def sam_box(bbox: tuple[float, ...], area: int) -> list[float]:
    """SAM's XYWH box of a mask from COCO's tight box: SAM subtracts the first pixel's index from the last's
    (amg.batched_mask_to_box, box_xyxy_to_xywh), so its width and height are COCO's minus one; zeros when empty."""
    x, y, w, h = bbox
    return [x, y, w - 1, h - 1] if area else [0.0, 0.0, 0.0, 0.0]


# --- one file -----------------------------------------------------------------------------------


def parse_image(where: str, data: object, forms: dict[str, str]) -> ImagePrediction:
    """One SA-1B file's content as an ImagePrediction (category OBJECT, score = predicted IoU, segment ids =
    annotation ids); `forms` gathers each number's form (int or float) and must agree with what it holds."""
    if not isinstance(data, dict) or set(data) != {"image", "annotations"} or not isinstance(data["image"], dict) \
            or not isinstance(data["annotations"], list):
        raise SegpipeError(f"{where}: not an SA-1B file (expected an object with an 'image' object and an "
                           "'annotations' list, nothing else)")
    image = data["image"]
    _check_keys(where, "image", image, IMAGE_KEYS)
    height, width = image["height"], image["width"]
    if not _is_int(image["image_id"]) or not isinstance(image["file_name"], str) \
            or not all(_is_int(v) and v > 0 for v in (height, width)):
        raise SegpipeError(f"{where}: image needs an integer image_id, a file_name and positive integer "
                           "height and width")
    segments, seen = [], set()
    for k, ann in enumerate(data["annotations"]):
        if not isinstance(ann, dict) or not _is_int(ann.get("id")):
            raise SegpipeError(f"{where}: annotations[{k}] is not an object with an integer 'id'")
        at = f"{where}: annotation {ann['id']}"
        if ann["id"] in seen:
            raise SegpipeError(f"{at}: duplicate annotation id")
        seen.add(ann["id"])
        _check_keys(at, "annotation", ann, ANNOTATION_KEYS)
        segments.append(_segment(at, ann, height, width, forms))
    return ImagePrediction(image["image_id"], image["file_name"], height, width, tuple(segments))


def _check_keys(where: str, what: str, item: dict, keys: tuple[str, ...]) -> None:
    missing, extra = [k for k in keys if k not in item], [k for k in item if k not in keys]
    if missing or extra:
        raise SegpipeError(f"{where}: {what} lacks {missing[0]!r}" if missing else
                           f"{where}: {what} has {extra[0]!r}, which SA-1B has not (it would be lost)")


def _segment(at: str, ann: dict, height: int, width: int, forms: dict[str, str]) -> Segment:
    segmentation = ann["segmentation"]
    if not (isinstance(segmentation, dict) and set(segmentation) == {"size", "counts"}
            and isinstance(segmentation["counts"], str) and isinstance(segmentation["size"], list)):
        raise SegpipeError(f"{at}: segmentation is not COCO compressed RLE ({{'size': [h, w], 'counts': str}})")
    if segmentation["size"] != [height, width]:
        raise SegpipeError(f"{at}: mask size {segmentation['size']} is not the image's [{height}, {width}]")
    try:
        runs = rle_counts(segmentation["counts"])
    except ValueError as error:
        raise SegpipeError(f"{at}: malformed RLE counts ({error})") from None
    if sum(runs) != height * width:
        raise SegpipeError(f"{at}: RLE counts cover {sum(runs)} pixels, the image {height * width}")
    for key, shape in (("bbox", "4 numbers"), ("crop_box", "4 numbers"), ("point_coords", "a list of [x, y]"),
                       ("area", "a number"), ("predicted_iou", "a number"), ("stability_score", "a number")):
        numbers = _numbers(ann[key], key)
        if numbers is None:
            raise SegpipeError(f"{at}: '{key}' is {ann[key]!r}, expected {shape}")
        if not numbers:  # no point: nothing to learn the form from
            continue
        form = "int" if all(_is_int(v) for v in numbers) else "float" if all(type(v) is float for v in numbers) else None
        if form is None or forms.setdefault(key, form) != form:
            raise SegpipeError(f"{at}: '{key}' mixes integers and floats" if form is None else
                               f"{at}: '{key}' holds {form}s where earlier annotations hold {forms[key]}s; "
                               "segpipe keeps one form a key, so the file could not be written back as it is")
    rle = Rle(segmentation["counts"], height, width)
    area, bbox = sum(runs[1::2]), rle.bbox()
    if ann["area"] != area:
        raise SegpipeError(f"{at}: area {ann['area']} is not its mask's {area} pixels")
    if ann["bbox"] != sam_box(bbox, area):
        raise SegpipeError(f"{at}: bbox {ann['bbox']} is not its mask's box {sam_box(bbox, area)} "
                           "(SAM's XYWH: last pixel index minus first)")
    return Segment(ann["id"], OBJECT["id"], rle, area, bbox, float(ann["predicted_iou"]),
                   stability=float(ann["stability_score"]),
                   point_coords=tuple((float(x), float(y)) for x, y in ann["point_coords"]),
                   crop_box=tuple(float(v) for v in ann["crop_box"]))


def _numbers(value: object, key: str) -> list | None:
    """The numbers a key holds in SA-1B's shape for it; None when the shape is wrong."""
    if key == "point_coords":
        ok = isinstance(value, list) and all(isinstance(p, list) and len(p) == 2 for p in value)
        value = [v for p in value for v in p] if ok else None
    elif key in ("bbox", "crop_box"):
        value = value if isinstance(value, list) and len(value) == 4 else None
    else:
        value = [value]
    return value if value is not None and all(_is_number(v) for v in value) else None


def image_json(prediction: ImagePrediction, forms: dict[str, str], where: str) -> dict:
    """One image as SA-1B's JSON, numbers in `forms`; segments must be class-agnostic SAM proposals."""
    annotations = []
    for s in prediction.segments:
        at = f"{where}: image {prediction.image_id}: segment {s.id}"
        if s.category_id != OBJECT["id"]:
            raise SegpipeError(f"{at}: category {s.category_id}; SA-1B holds class-agnostic masks (category "
                               f"{OBJECT['id']}, {OBJECT['name']!r}) only")
        if s.stability is None or s.point_coords is None or s.crop_box is None:
            raise SegpipeError(f"{at}: no stability, point_coords or crop_box; SA-1B needs SAM's signals")
        values = {"area": s.area, "bbox": sam_box(s.bbox, s.area), "predicted_iou": s.score,
                  "point_coords": [list(p) for p in s.point_coords], "stability_score": s.stability,
                  "crop_box": list(s.crop_box)}
        written = {key: _as(value, forms.get(key, SAM_FORMS[key])) for key, value in values.items()}
        annotations.append({"id": s.id, "segmentation": s.rle.to_coco(), **{k: written[k] for k in ANNOTATION_KEYS[2:]}})
    image = {"image_id": prediction.image_id, "file_name": prediction.file_name, "height": prediction.height,
             "width": prediction.width}
    return {"image": image, "annotations": annotations}


def _as(value: object, form: str) -> object:
    """A number (or nested lists of them) as an int where the form is int and the value whole, else a float."""
    if isinstance(value, list):
        return [_as(v, form) for v in value]
    return int(value) if form == "int" and float(value).is_integer() else float(value)


def json_name(file_name: str) -> str:
    """SA-1B names an image's JSON after it: sa_1.jpg -> sa_1.json."""
    folder, _, name = file_name.rpartition("/")
    stem = name.rsplit(".", 1)[0] if "." in name else name
    return f"{folder}/{stem}.json" if folder else f"{stem}.json"


# --- folders ------------------------------------------------------------------------------------


def is_sa1b_folder(uri: str) -> bool:
    """A folder of .json files that is no `segpipe infer` output (which holds run.json)."""
    fs, path = url_to_fs(uri)
    return fs.isdir(path) and not fs.exists(join(path, "run.json")) and bool(_json_files(fs, path))


def _json_files(fs, path: str) -> list[str]:
    """The .json files under a folder, numbers in names in numeric order (sa_2 before sa_10)."""
    found = [p for p in fs.find(path) if p.endswith(".json") and not is_hidden(p[len(path):])]
    return sorted(found, key=lambda p: [int(t) if t.isdigit() else t for t in re.split(r"(\d+)", p)])


def read_folder(src: str, out: str, images: str | None = None, images_per_file: int = 500) -> tuple[int, int]:
    """A folder of SA-1B files as a `segpipe infer` output folder at `out`: predictions/part-*.parquet (a file
    per `images_per_file` images, each file's rows in image-id order, an image's rows in its file's order),
    categories.json (OBJECT), run.json ("input": `images`, default the SA-1B folder, where SA-1B keeps its
    images; "sa1b": the number forms) and summary.json. Returns (images, segments).

    A file without annotations counts as an image (summary.json's "empty") but has no row (the table holds
    segments), so writing the folder back does not make it again."""
    fs, path = url_to_fs(src)
    files = _json_files(fs, path)
    if not files:
        raise SegpipeError(f"{src}: holds no .json files")
    forms: dict[str, str] = {}
    seen: dict[int, str] = {}
    n_segments, empty = 0, 0
    run_id = hashlib.sha256(absolute(src).encode()).hexdigest()[:16]
    for part, start in enumerate(range(0, len(files), images_per_file)):
        batch = []
        for p in files[start:start + images_per_file]:
            uri = join(src, p[len(path.rstrip("/")) + 1:])
            prediction = parse_image(uri, read_json(uri), forms)
            if prediction.image_id in seen:
                raise SegpipeError(f"{uri}: image id {prediction.image_id} is also {seen[prediction.image_id]}'s")
            seen[prediction.image_id] = uri
            batch.append(prediction)
            n_segments += len(prediction.segments)
            empty += not prediction.segments
        batch.sort(key=lambda p: p.image_id)
        write_predictions(join(out, "predictions", f"part-{part:05d}.parquet"), batch, run_id, MODEL)
    write_json(join(out, "categories.json"), [OBJECT])
    write_json(join(out, "summary.json"), {"images": len(seen), "segments": n_segments, "empty": empty, "failed": 0})
    write_json(join(out, "run.json"), {"input": absolute(images or src), "model": MODEL, "run_id": run_id,
                                       "sa1b": {"source": absolute(src), "forms": {**SAM_FORMS, **forms}}})
    return len(seen), n_segments


def write_folder(pred: str, out: str) -> tuple[int, int]:
    """A predictions folder (run.json, predictions/) of class-agnostic proposals as SA-1B files in `out`, one
    per image named after it, numbers in the forms run.json records (else SAM's). Returns (images, segments)."""
    run = read_json(join(pred, "run.json"))
    forms = {**SAM_FORMS, **(run.get("sa1b") or {}).get("forms", {})}
    written: dict[str, str] = {}
    n_segments = 0
    for uri in parquet_files(join(pred, "predictions")):
        fs, path = url_to_fs(uri)
        for prediction in predictions_from_arrow(pq.read_table(path, filesystem=fs)):
            name = json_name(prediction.file_name)
            if name in written:
                raise SegpipeError(f"{pred}: images {written[name]!r} and {prediction.file_name!r} both make {name}")
            written[name] = prediction.file_name
            content = image_json(prediction, forms, pred)
            write_bytes(join(out, name), json.dumps(content).encode("utf-8"))
            n_segments += len(prediction.segments)
    return len(written), n_segments
