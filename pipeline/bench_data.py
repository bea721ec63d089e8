"""The inputs of `segpipe bench eval`: COCO-shaped random instances (AP, and painted into panoptic maps for PQ)
and synth panoptic data (PQ, mIoU).

The instance data is drawn here, not rendered by `pipeline.synth`, so that segpipe is measured on data
shaped like COCO's rather than on what its own tests use: star-shaped polygons with 2-decimal float
coordinates and shoelace areas, uncompressed-RLE crowds with integer areas, images without annotations,
category ids 1..90 with COCO's gaps, and detections as compressed RLE with float boxes and scores.
Everything is made once per folder and reused while its `ready.json` matches the request.
"""

from __future__ import annotations

import json
import os
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
from pycocotools import mask as mask_utils

from pipeline.structures import encode_panoptic_png

COCO_MISSING_IDS = (12, 26, 29, 30, 45, 66, 68, 69, 71, 83)  # COCO's 80 categories are 1..90 less these
VERSION = 2  # bump when the data drawn for a seed changes, so caches are remade


@dataclass(frozen=True)
class Shape:
    """How many objects and detections an image holds, and how scores are drawn."""

    truths: float
    """Mean ground-truth objects per image (Poisson)."""
    detections: tuple[int, int]
    """Detections per image are drawn in this range (uniform), at least the copies of the ground truth."""
    score_step: float | None
    """Scores are rounded to multiples of this (ties across and within images); None: float32 scores."""


SHAPES = {
    "few": Shape(truths=4.0, detections=(2, 8), score_step=None),  # ~4 GT, ~6 detections an image
    "many": Shape(truths=12.0, detections=(40, 80), score_step=0.01),  # a detector's top-k, tied scores
}


def instance_paths(folder: Path) -> dict[str, Path]:
    return {"instances": folder / "instances.json", "results": folder / "results.json",
            "gt_table": folder / "gt-table", "pred_table": folder / "pred-table"}


def prepare_instances(folder: Path, shape: str, images: int, height: int, width: int, seed: int = 0) -> dict[str, Path]:
    """GT JSON, results JSON and both as tables (`segpipe convert`) for one shape; cached in `folder`."""
    from pipeline.convert import convert

    paths = instance_paths(folder)
    wanted = {"shape": shape, "images": images, "height": height, "width": width, "seed": seed, "version": VERSION,
              **asdict(SHAPES[shape])}
    if _ready(folder, wanted):
        return paths
    folder.mkdir(parents=True, exist_ok=True)
    gt, results = random_instances(SHAPES[shape], images, height, width, np.random.default_rng([seed, list(SHAPES).index(shape)]))
    paths["instances"].write_text(json.dumps(gt))
    paths["results"].write_text(json.dumps(results))
    convert(str(paths["instances"]), str(paths["gt_table"]), row_group_images=100)
    convert(str(paths["results"]), str(paths["pred_table"]), gt=str(paths["instances"]), row_group_images=100)
    _mark_ready(folder, wanted)
    return paths


def random_instances(shape: Shape, images: int, height: int, width: int, rng: np.random.Generator) -> tuple[dict, list]:
    """A COCO instances file and a detector's results on it, both in the file's (unsorted) image order."""
    category_ids = [c for c in range(1, 91) if c not in COCO_MISSING_IDS]
    categories = [{"id": c, "name": f"class{c}", "supercategory": f"group{c // 10}"} for c in category_ids]
    image_ids = rng.choice(np.arange(1, 600_000), images, replace=False)  # unsorted, with gaps, as COCO's
    coco_images, annotations, results = [], [], []
    for image_id in (int(i) for i in image_ids):
        coco_images.append({"id": image_id, "file_name": f"{image_id:012d}.jpg", "height": height, "width": width})
        n_truths = 0 if rng.random() < 0.03 else int(rng.poisson(shape.truths))
        objects = []
        for _ in range(n_truths):
            category = int(rng.choice(category_ids))
            if rng.random() < 0.02:  # a crowd: uncompressed RLE, integer area
                rle = _blob(rng, height, width)
                uncompressed = {"size": [height, width], "counts": _run_lengths(rle)}
                annotations.append({"segmentation": uncompressed, "area": int(mask_utils.area(rle)), "iscrowd": 1,
                                    "image_id": image_id, "bbox": [float(v) for v in mask_utils.toBbox(rle)],
                                    "category_id": category, "id": len(annotations) + 1})
                continue
            polygons = [_polygon(rng, height, width)] + ([_polygon(rng, height, width, 0.3)] if rng.random() < 0.1 else [])
            annotations.append({"segmentation": polygons, "area": sum(_shoelace(p) for p in polygons), "iscrowd": 0,
                                "image_id": image_id, "bbox": _polygon_box(polygons), "category_id": category,
                                "id": len(annotations) + 1})
            objects.append((category, polygons))
        results += _detections(shape, rng, image_id, objects, category_ids, height, width)
    return {"info": {"description": "segpipe bench: random COCO-shaped instances"}, "licenses": [],
            "images": coco_images, "annotations": annotations, "categories": categories}, results


def _detections(shape: Shape, rng: np.random.Generator, image_id: int, objects: list, category_ids: list,
                height: int, width: int) -> list[dict]:
    """Jittered copies of most objects (some twice, some of a wrong class), then false positives, by score."""
    found = []
    for category, polygons in objects:
        if rng.random() < 0.15:
            continue  # a miss
        for copy in range(1 + (rng.random() < 0.3)):  # a duplicate now and then
            wrong = rng.random() < 0.1
            found.append((int(rng.choice(category_ids)) if wrong else category,
                          [_jitter(rng, p, height, width, 0.05 + 0.1 * copy) for p in polygons], rng.beta(5, 2)))
    target = max(len(found), int(rng.integers(shape.detections[0], shape.detections[1] + 1)))
    while len(found) < target:
        found.append((int(rng.choice(category_ids)), [_polygon(rng, height, width)], rng.beta(2, 5)))
    detections = []
    for category, polygons, score in found:
        rle = mask_utils.merge(mask_utils.frPyObjects(polygons, height, width))
        box = mask_utils.toBbox(rle) + rng.normal(0, 1.5, 4)  # a box head's box: near the mask's, not equal
        score = round(score / shape.score_step) * shape.score_step if shape.score_step else float(np.float32(score))
        detections.append({"image_id": image_id, "category_id": category,
                           "segmentation": {"size": [height, width], "counts": rle["counts"].decode("ascii")},
                           "bbox": [round(float(v), 2) for v in box], "score": round(score, 6)})
    return sorted(detections, key=lambda d: -d["score"])  # a detector writes an image's results by score


def _polygon(rng: np.random.Generator, height: int, width: int, scale: float = 1.0) -> list[float]:
    """A star-shaped polygon; sizes log-uniform so that small, medium and large objects all occur."""
    radius = scale * np.exp(rng.uniform(np.log(4), np.log(min(height, width) / 3)))
    cx, cy = rng.uniform(0, width), rng.uniform(0, height)
    angles = np.sort(rng.uniform(0, 2 * np.pi, int(rng.integers(5, 20))))
    radii = radius * rng.uniform(0.5, 1.0, len(angles))
    xs = np.clip(cx + radii * np.cos(angles), 0, width)
    ys = np.clip(cy + radii * np.sin(angles), 0, height)
    return [round(float(v), 2) for v in np.column_stack([xs, ys]).ravel()]


def _jitter(rng: np.random.Generator, polygon: list[float], height: int, width: int, amount: float) -> list[float]:
    """The polygon shifted, scaled and its vertices moved by about `amount` of its size."""
    points = np.asarray(polygon).reshape(-1, 2)
    centre, size = points.mean(axis=0), np.ptp(points, axis=0).max() + 1
    moved = centre + (points - centre) * rng.uniform(1 - amount, 1 + amount) + rng.normal(0, amount * size, points.shape)
    moved = np.clip(moved, 0, [width, height])
    return [round(float(v), 2) for v in moved.ravel()]


def _blob(rng: np.random.Generator, height: int, width: int) -> dict:
    """A crowd region: the union of a few polygons near one another, as compressed RLE."""
    first = _polygon(rng, height, width, 1.5)
    parts = [first] + [_jitter(rng, first, height, width, 0.4) for _ in range(int(rng.integers(1, 4)))]
    return mask_utils.merge(mask_utils.frPyObjects(parts, height, width))


def _run_lengths(rle: dict) -> list[int]:
    from pipeline.structures import rle_counts

    return rle_counts(rle["counts"].decode("ascii"))


def _shoelace(polygon: list[float]) -> float:
    x, y = np.asarray(polygon[0::2]), np.asarray(polygon[1::2])
    return float(abs(np.dot(x, np.roll(y, -1)) - np.dot(y, np.roll(x, -1))) / 2)


def _polygon_box(polygons: list[list[float]]) -> list[float]:
    xs = [v for p in polygons for v in p[0::2]]
    ys = [v for p in polygons for v in p[1::2]]
    return [min(xs), min(ys), round(max(xs) - min(xs), 2), round(max(ys) - min(ys), 2)]


# --- panoptic (PQ) and semantic (mIoU) data, from synth -------------------------------------------


def panoptic_paths(folder: Path) -> dict[str, Path]:
    return {"panoptic": folder / "annotations" / "panoptic_val.json",
            "panoptic_pred": folder / "predictions" / "panoptic_pred.json",
            "panoptic_pred_table": folder / "predictions" / "table",
            "panoptic_gt_table": folder / "panoptic-table",
            "labels_gt": folder / "labels" / "gt", "labels_pred": folder / "labels" / "pred",
            "classes": folder / "labels" / "classes.json"}


def prepare_panoptic(folder: Path, images: int, height: int, width: int, seed: int = 0) -> dict[str, Path]:
    """Synth panoptic GT and perturbed predictions, as PNG+JSON, tables and semantic label PNGs; cached."""
    from pipeline.convert import convert
    from pipeline.synth import SynthConfig, write_dataset, write_perturbed_panoptic

    paths = panoptic_paths(folder)
    wanted = {"images": images, "height": height, "width": width, "seed": seed, "version": VERSION}
    if _ready(folder, wanted):
        return paths
    write_dataset(str(folder), SynthConfig(images=images, split="val", seed=seed, height=height, width=width,
                                           workers=os.cpu_count() or 1))
    write_perturbed_panoptic(str(paths["panoptic"]), str(paths["panoptic_pred"]), seed)
    _panoptic_table(paths["panoptic_pred"], paths["panoptic_pred_table"])
    convert(str(paths["panoptic"]), str(paths["panoptic_gt_table"]), row_group_images=100)
    _label_pngs(paths)
    _mark_ready(folder, wanted)
    return paths


STUFF = [{"id": 184, "name": "tree", "isthing": 0}, {"id": 187, "name": "sky", "isthing": 0},
         {"id": 193, "name": "grass", "isthing": 0}, {"id": 149, "name": "road", "isthing": 0}]


def prepare_panoptic_shape(folder: Path, shape: str, images: int, height: int, width: int, seed: int = 0
                           ) -> dict[str, Path]:
    """A shape's random instances painted into panoptic PNG + JSON (GT: two stuff regions under the objects,
    in file order, crowds kept as crowd, a VOID patch now and then; prediction: the stuff border moved and the
    detections scoring at least 0.5 painted lowest score first), and both as tables; cached in `folder`."""
    from pipeline.convert import convert

    paths = panoptic_paths(folder)
    wanted = {"shape": shape, "images": images, "height": height, "width": width, "seed": seed, "version": VERSION,
              "panoptic": True, **asdict(SHAPES[shape])}
    if _ready(folder, wanted):
        return paths
    rng = np.random.default_rng([seed, list(SHAPES).index(shape), 1])
    gt, results = random_instances(SHAPES[shape], images, height, width, rng)
    things = [{**c, "isthing": 1} for c in gt["categories"]]
    sides = {"panoptic": {"images": gt["images"], "categories": things + STUFF, "annotations": []},
             "panoptic_pred": {"images": gt["images"], "categories": things + STUFF, "annotations": []}}
    truths, detections = {}, {}
    for annotation in gt["annotations"]:
        truths.setdefault(annotation["image_id"], []).append(annotation)
    for result in results:
        if result["score"] >= 0.5:
            detections.setdefault(result["image_id"], []).append(result)
    for image in gt["images"]:
        horizon = int(rng.integers(height // 4, 3 * height // 4))
        below, above = (int(c) for c in rng.choice([s["id"] for s in STUFF], 2, replace=False))
        layers = [(m["category_id"], _mask(m["segmentation"], height, width), m["iscrowd"])
                  for m in truths.get(image["id"], [])]
        void = rng.random() < 0.3
        for key, border, objects in (("panoptic", horizon, layers),
                                     ("panoptic_pred", horizon + int(rng.normal(0, 8)),
                                      [(d["category_id"], _mask(d["segmentation"], height, width), 0)
                                       for d in sorted(detections.get(image["id"], []), key=lambda d: d["score"])])):
            ids, info = _paint(rng, height, width, border, (above, below), objects, void and key == "panoptic")
            name = f"{image['id']:012d}.png"
            folder_png = paths[key].with_suffix("")
            folder_png.mkdir(parents=True, exist_ok=True)
            (folder_png / name).write_bytes(encode_panoptic_png(ids))
            sides[key]["annotations"].append({"image_id": image["id"], "file_name": name, "segments_info": info})
    for key, data in sides.items():
        paths[key].write_text(json.dumps(data))
    _panoptic_table(paths["panoptic_pred"], paths["panoptic_pred_table"])
    convert(str(paths["panoptic"]), str(paths["panoptic_gt_table"]), row_group_images=100)
    _mark_ready(folder, wanted)
    return paths


def _mask(segmentation: dict | list, height: int, width: int) -> np.ndarray:
    if isinstance(segmentation, list):
        rle = mask_utils.merge(mask_utils.frPyObjects(segmentation, height, width))
    else:
        rle = mask_utils.frPyObjects(segmentation, height, width) if isinstance(segmentation["counts"], list) else \
            {"size": segmentation["size"], "counts": segmentation["counts"].encode("ascii")}
    return mask_utils.decode(rle).astype(bool)


def _paint(rng: np.random.Generator, height: int, width: int, border: int, stuff: tuple[int, int], objects: list,
           void: bool) -> tuple[np.ndarray, list[dict]]:
    """An id map and its segments_info: two stuff regions split at `border`, the objects painted in order."""
    index = np.zeros((height, width), np.int32)  # 0 VOID, k the k-th layer
    index[:max(border, 0)] = 1
    index[max(border, 0):] = 2
    layers = [(stuff[0], 0), (stuff[1], 0)]
    for category, mask, crowd in objects:
        layers.append((category, crowd))
        index[mask] = len(layers)
    if void:
        y, x = int(rng.integers(0, height - 20)), int(rng.integers(0, width - 20))
        index[y:y + int(rng.integers(5, 40)), x:x + int(rng.integers(5, 40))] = 0
    segment_ids = rng.choice(np.arange(1, 2**24), len(layers), replace=False)
    ids = np.zeros((height, width), np.uint32)
    areas = np.bincount(index.ravel(), minlength=len(layers) + 1)
    info = []
    for k, (category, crowd) in enumerate(layers, start=1):
        if not areas[k]:
            continue
        where = index == k
        ids[where] = segment_ids[k - 1]
        rows, cols = np.flatnonzero(where.any(axis=1)), np.flatnonzero(where.any(axis=0))
        info.append({"id": int(segment_ids[k - 1]), "category_id": category, "iscrowd": int(crowd),
                     "area": int(areas[k]), "bbox": [int(cols[0]), int(rows[0]), int(cols[-1] - cols[0] + 1),
                                                     int(rows[-1] - rows[0] + 1)]})
    return ids, info


def _panoptic_table(pred_json: Path, out: Path, images_per_file: int = 100) -> None:
    """The panoptic predictions as a predictions table (RLE rows, no PNGs), in image-id order as tables are."""
    from pipeline.io.tables import write_predictions
    from pipeline.structures import ImagePrediction, decode_panoptic_png

    data = json.loads(pred_json.read_text())
    folder = pred_json.with_suffix("")
    annotations = sorted(data["annotations"], key=lambda a: a["image_id"])
    for start in range(0, len(annotations), images_per_file):
        batch = [ImagePrediction.from_panoptic(a["image_id"], a["file_name"],
                                               decode_panoptic_png((folder / a["file_name"]).read_bytes(), a["file_name"]),
                                               a["segments_info"])
                 for a in annotations[start:start + images_per_file]]
        write_predictions(str(out / f"part-{start // images_per_file:05d}.parquet"), batch, "bench", "perturb")


def _label_pngs(paths: dict[str, Path]) -> None:
    """The semantic view of both panoptic sides as label PNGs: class index per pixel, 255 for VOID (and GT crowd).

    The class index is the category's position in the GT's list, as `segpipe eval miou` numbers a
    panoptic file's classes, so mIoU on these PNGs equals mIoU on the panoptic files.
    """
    from PIL import Image

    from pipeline.structures import decode_panoptic_png

    gt = json.loads(paths["panoptic"].read_text())
    index = {c["id"]: k for k, c in enumerate(gt["categories"])}
    paths["classes"].parent.mkdir(parents=True, exist_ok=True)
    paths["classes"].write_text(json.dumps([c["name"] for c in gt["categories"]]))
    for key, source, crowd_ignored in (("labels_gt", paths["panoptic"], True), ("labels_pred", paths["panoptic_pred"], False)):
        paths[key].mkdir(parents=True, exist_ok=True)
        for annotation in json.loads(source.read_text())["annotations"]:
            png = source.with_suffix("") / annotation["file_name"]
            ids = decode_panoptic_png(png.read_bytes(), str(png))
            labels = np.full(ids.shape, 255, np.uint8)
            for segment in annotation["segments_info"]:
                if not (crowd_ignored and segment.get("iscrowd", 0)):
                    labels[ids == segment["id"]] = index[segment["category_id"]]
            Image.fromarray(labels).save(paths[key] / Path(annotation["file_name"]).with_suffix(".png").name)


def _ready(folder: Path, wanted: dict) -> bool:
    marker = folder / "ready.json"
    return marker.exists() and json.loads(marker.read_text()) == wanted


def _mark_ready(folder: Path, wanted: dict) -> None:
    (folder / "ready.json").write_text(json.dumps(wanted))
