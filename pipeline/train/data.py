"""Training data: a COCO panoptic or instances file, or segpipe's predictions table (pseudo-labels), with its images."""

from __future__ import annotations

import hashlib
import re
from dataclasses import dataclass

import numpy as np
import pyarrow as pa

from pipeline.errors import SegpipeError
from pipeline.io.decode import ImageDecodeError, decode_image
from pipeline.io.fs import join, parse_json, read_bytes, read_json, url_to_fs
from pipeline.io.shards import list_shards, read_named, read_shard
from pipeline.structures import Rle, decode_panoptic_png


@dataclass(frozen=True)
class Example:
    """One labelled image, as listed by the dataset (nothing read yet)."""

    image_id: int
    file_name: str  # the image's key in the image shards
    height: int
    width: int
    segments: tuple[dict, ...]
    """panoptic: segments_info; instances: annotations; predictions: rows (segment_id, category_id, iscrowd, rle)."""
    png: str | None = None  # panoptic: the PNG's file name in the dataset's PNG folder


@dataclass(frozen=True)
class Dataset:
    uri: str
    kind: str  # "panoptic", "instances" or "predictions"
    categories: tuple[dict, ...]
    examples: tuple[Example, ...]
    images: str  # folder, tar shards or Parquet files holding the images
    png_dir: str | None
    fingerprint: str
    """sha256 of the labels (the annotation file or the table's files) and the image names."""


@dataclass
class Sample:
    """A decoded example: the image and its labels as a panoptic map (segments never overlap)."""

    image_id: int
    image: np.ndarray  # H x W x 3 uint8
    ids: np.ndarray  # H x W uint32, 0 = unlabelled
    segments: list[dict]  # id, category_id, iscrowd


def load_dataset(uri: str, images: str | None = None) -> Dataset:
    """The dataset at `uri`: a COCO JSON (panoptic when its annotations have segments_info), or a
    `segpipe infer` output folder (its predictions table, images from the run's input)."""
    fs, path = url_to_fs(uri)
    if not path.endswith(".json") and fs.isdir(path):
        return _predictions(uri, images)
    data = read_bytes(uri)
    coco = parse_json(data, uri)
    if not isinstance(coco, dict) or not all(isinstance(coco.get(k), list) for k in ("images", "annotations", "categories")):
        raise SegpipeError(f"{uri}: not a COCO file (needs 'images', 'annotations', 'categories')")
    if not coco["categories"]:
        raise SegpipeError(f"{uri}: lists no categories")
    images = images or _coco_images(uri)
    by_id = {im["id"]: im for im in coco["images"]}
    if coco["annotations"] and "segments_info" in coco["annotations"][0]:
        kind = "panoptic"
        examples = [Example(a["image_id"], by_id[a["image_id"]]["file_name"], by_id[a["image_id"]]["height"],
                            by_id[a["image_id"]]["width"], tuple(a["segments_info"]), a["file_name"])
                    for a in coco["annotations"] if a.get("image_id") in by_id]
        categories = coco["categories"]
    else:
        kind = "instances"
        per_image: dict[int, list[dict]] = {}
        for a in coco["annotations"]:
            per_image.setdefault(a["image_id"], []).append(a)
        examples = [Example(im["id"], im["file_name"], im["height"], im["width"], tuple(per_image[im["id"]]))
                    for im in coco["images"] if im["id"] in per_image]
        categories = [{**c, "isthing": c.get("isthing", 1)} for c in coco["categories"]]
    if not examples:
        raise SegpipeError(f"{uri}: holds no annotated images")
    names = sorted(e.file_name for e in examples)
    fingerprint = hashlib.sha256(data + "\n".join(names).encode()).hexdigest()
    png_dir = uri[: -len(".json")] if kind == "panoptic" else None
    return Dataset(uri, kind, tuple(categories), tuple(examples), images, png_dir, fingerprint)


def _coco_images(uri: str) -> str:
    """COCO's layout: ROOT/annotations/{panoptic,instances}_SPLIT.json labels the images in ROOT/SPLIT."""
    match = re.search(r"(.*)/annotations/(?:panoptic|instances)_([^/]+)\.json$", uri)
    if not match:
        raise SegpipeError(f"{uri}: not in COCO's layout (ROOT/annotations/panoptic_SPLIT.json); "
                           "say where the images are with --train-images / --val-images")
    return f"{match[1]}/{match[2]}"


def _predictions(uri: str, images: str | None) -> Dataset:
    """A `segpipe infer` output folder: predictions/*.parquet, categories.json and run.json (its input)."""
    from pipeline.io.tables import parquet_files, read_columns

    run = join(uri, "run.json")
    if not url_to_fs(run)[0].exists(url_to_fs(run)[1]):
        raise SegpipeError(f"{uri}: a folder, but not a `segpipe infer` output (no run.json); "
                           "give a COCO JSON or an infer output folder")
    images = images or read_json(run)["input"]
    categories = read_json(join(uri, "categories.json"))
    files = parquet_files(join(uri, "predictions"))
    columns = ["image_id", "file_name", "height", "width", "segment_id", "category_id", "iscrowd", "rle"]
    table = pa.concat_tables([read_columns(f, columns) for f in files]).to_pydict()
    per_image: dict[int, list[int]] = {}
    for row, image_id in enumerate(table["image_id"]):
        per_image.setdefault(image_id, []).append(row)
    examples = []
    for image_id, rows in per_image.items():
        first = rows[0]
        segments = tuple({"id": table["segment_id"][r], "category_id": table["category_id"][r],
                          "iscrowd": int(table["iscrowd"][r]), "rle": table["rle"][r]} for r in rows)
        examples.append(Example(image_id, table["file_name"][first], table["height"][first], table["width"][first],
                                segments))
    if not examples:
        raise SegpipeError(f"{uri}: its predictions table has no rows")
    digest = hashlib.sha256()
    for f in files:
        digest.update(read_bytes(f))
    return Dataset(uri, "predictions", tuple(categories), tuple(examples), images, None, digest.hexdigest())


def check_categories(dataset: Dataset, model_categories: list[dict], model: str, things_only: bool) -> None:
    """Every category the labels use must be one the model predicts."""
    known = {c["id"] for c in model_categories}
    used = {c["id"] for c in dataset.categories if not things_only or c.get("isthing")}
    missing = sorted(used - known)
    if missing:
        names = {c["id"]: c.get("name") for c in dataset.categories}
        raise SegpipeError(f"{dataset.uri}: category {missing[0]} ({names[missing[0]]!r}) is not in {model}'s "
                           f"categories" + (f" (and {len(missing) - 1} more)" if len(missing) > 1 else "")
                           + "; train from scratch, or give a checkpoint made for these categories")


def read_encoded(dataset: Dataset, examples: list[Example]) -> list[tuple[bytes, bytes | None]]:
    """(image bytes, PNG bytes or None) of `examples`, read once; images missing from the shards are an error."""
    wanted = {e.file_name for e in examples}
    found = {record.key: record.data for record in read_named(dataset.images, wanted)}
    _missing(dataset, wanted - found.keys())
    pngs = [read_bytes(join(dataset.png_dir, e.png)) if e.png else None for e in examples]
    return [(found[e.file_name], png) for e, png in zip(examples, pngs)]


def check_images(dataset: Dataset) -> None:
    """Images the labels list but the image shards lack, named on the driver before any training starts
    (image folders are listed; tar and Parquet shards are read through once)."""
    found: set[str] = set()
    for shard in list_shards(dataset.images):
        found.update(shard.members if shard.kind == "folder" else (record.key for record in read_shard(shard)))
    _missing(dataset, {e.file_name for e in dataset.examples} - found)


def _missing(dataset: Dataset, missing: set[str]) -> None:
    if missing:
        first = sorted(missing)[0]
        raise SegpipeError(f"{dataset.uri}: image {first!r} is not under {dataset.images}"
                           + (f" (nor {len(missing) - 1} more)" if len(missing) > 1 else ""))


def decode(dataset: Dataset, example: Example, image: bytes, png: bytes | None) -> Sample:
    """The example's image and its labels as a panoptic map.

    Instance annotations (which may overlap) are painted largest first, so a smaller object lying on a
    larger one keeps all its pixels, as COCO's own panoptic conversion does.
    """
    where = f"{dataset.uri}: image {example.image_id} ({example.file_name})"
    try:
        rgb = decode_image(image)
    except ImageDecodeError as error:
        raise SegpipeError(f"{where}: {error}") from None
    if rgb.shape[:2] != (example.height, example.width):
        raise SegpipeError(f"{where}: the image is {rgb.shape[0]}x{rgb.shape[1]}, the labels say "
                           f"{example.height}x{example.width}")
    if dataset.kind == "panoptic":
        ids = decode_panoptic_png(png, f"{dataset.png_dir}/{example.png}")
        segments = [{"id": s["id"], "category_id": s["category_id"], "iscrowd": s.get("iscrowd", 0)}
                    for s in example.segments]
        return Sample(example.image_id, rgb, ids, segments)
    ids = np.zeros((example.height, example.width), np.uint32)
    segments = []
    if dataset.kind == "instances":
        painted = sorted(enumerate(example.segments), key=lambda item: -float(item[1].get("area", 0)))
        for k, annotation in painted:
            mask = Rle.from_coco(annotation["segmentation"], example.height, example.width).to_mask()
            ids[mask] = k + 1
            segments.append({"id": k + 1, "category_id": annotation["category_id"],
                             "iscrowd": annotation.get("iscrowd", 0)})
    else:
        # Painted in row order, as k + 1: a predictions table's ids need only be unique in their image (SA-1B's
        # annotation ids pass 2^24), and `segpipe classify` writes proposals largest first so smaller ones keep
        # their pixels.
        for k, row in enumerate(example.segments):
            ids[Rle.from_coco({"size": [example.height, example.width], "counts": row["rle"]},
                              example.height, example.width).to_mask()] = k + 1
            segments.append({"id": k + 1, "category_id": row["category_id"], "iscrowd": row["iscrowd"]})
    # A segment painted over entirely (a whole object under its parts) is no target: it has no pixel to learn.
    visible = np.bincount(ids.ravel(), minlength=len(segments) + 1) > 0
    return Sample(example.image_id, rgb, ids, [s for s in segments if visible[s["id"]]])
