"""The report's Health section: every check of hotcoco's healthcheck, on masks too, plus panoptic and image-file checks, per shard then merged."""

from __future__ import annotations

import hashlib
import re
from collections import defaultdict
from dataclasses import dataclass, field, replace
from urllib.parse import quote

import imagehash
import numpy as np
import pyarrow as pa
from PIL import Image
from pycocotools import mask as mask_utils

from pipeline import validate
from pipeline.io.decode import ImageDecodeError, decode_image
from pipeline.io.shards import read_named
from pipeline.report.parts import Parts

# Every check: name -> (group, severity, what it finds). The names, and the thresholds in HealthSettings, are
# hotcoco's (`healthcheck.rs`) where hotcoco has the check. Errors make a file inconsistent (`segpipe validate`
# fails on them); warnings are legal but suspect.
CHECKS = {
    # structure: hotcoco's layer 1, from the whole file (global_checks)
    "duplicate_image_id": ("structure", "error", "image id listed more than once"),
    "duplicate_ann_id": ("structure", "error", "annotation id listed more than once"),
    "duplicate_category_id": ("structure", "error", "category id listed more than once"),
    "orphan_image_id": ("structure", "error", "annotation of an image id that 'images' does not list"),
    "orphan_category_id": ("structure", "error", "annotation or segment of a category id that 'categories' does not list"),
    "missing_geometry": ("structure", "error", "annotation with no bbox, segmentation or keypoints"),
    "zero_dimensions": ("structure", "error", "image whose height or width is not a positive integer"),
    "bad_image_record": ("structure", "error", "image without an integer id, or without a file_name inside its folder"),
    "bad_category_record": ("structure", "error", "category without an integer id, or panoptic 'isthing' not 0 or 1"),
    "bad_annotation_field": ("structure", "error", "'iscrowd' not 0 or 1, or 'area' / 'bbox' not numbers"),
    # quality: hotcoco's layer 2, on boxes (and panoptic segments' boxes)
    "degenerate_bbox": ("quality", "warning", "box width or height <= 0"),
    "zero_area": ("quality", "warning", "'area' is 0"),
    "bbox_out_of_bounds": ("quality", "warning", "box extends outside the image"),
    "extreme_aspect_ratio": ("quality", "warning", "box aspect ratio above {max_aspect_ratio:g}:1"),
    "near_duplicate": ("quality", "warning", "same image and class, box IoU above {near_duplicate_iou:g}"),
    # distribution: hotcoco's layer 3 (the imbalance ratio goes to the summary, as in hotcoco)
    "zero_instance_category": ("distribution", "warning", "category with no instances"),
    "low_instance_category": ("distribution", "warning", "category with fewer than {low_instances} instances"),
    # compatibility: hotcoco's layer 4, when detections are given (ids: 1-based positions, as COCO.loadRes numbers them)
    "dt_orphan_image_id": ("compatibility", "error", "detection of an image id the ground truth does not list"),
    "dt_orphan_category_id": ("compatibility", "error", "detection of a category id the ground truth does not list"),
    "dt_missing_score": ("compatibility", "warning", "detection without a score"),
    "dt_score_out_of_range": ("compatibility", "warning", "detection score outside [0, 1]"),
    # masks: the pixels against the JSON (segpipe validate's measurements, plus what a mask alone shows)
    "broken_mask": ("masks", "error", "segmentation that cannot be decoded, or whose size is not the image's"),
    "empty_mask": ("masks", "error", "mask without a pixel"),
    "area_mask_mismatch": ("masks", "error", "'area' disagrees with the mask's pixels"),
    "box_mask_mismatch": ("masks", "error", "'bbox' disagrees with the mask's box"),
    "mask_out_of_bounds": ("masks", "warning", "polygon vertices outside the image (pycocotools clips them away)"),
    "self_overlap": ("masks", "warning", "over {self_overlap:.0%} of a polygon lies inside another of the same instance"),
    "near_duplicate_mask": ("masks", "warning", "same image and class, mask IoU above {near_duplicate_iou:g}"),
    # panoptic: the rest of segpipe validate's panoptic checks
    "panoptic_annotation": ("panoptic", "error", "image with no or several panoptic annotations, or a malformed one"),
    "bad_segment_id": ("panoptic", "error", "segment id outside 1..2^24-1"),
    "duplicate_segment_id": ("panoptic", "error", "segment id listed twice in one image"),
    "png_unreadable": ("panoptic", "error", "panoptic PNG missing or not an 8-bit RGB PNG"),
    "png_size_mismatch": ("panoptic", "error", "panoptic PNG size differs from the image's"),
    "unlisted_segment": ("panoptic", "error", "segment id in the PNG that segments_info does not list"),
    # images: the files themselves
    "image_missing": ("images", "error", "image file not found under the image root"),
    "image_unreadable": ("images", "error", "image file that cannot be decoded"),
    "image_size_mismatch": ("images", "error", "decoded image size differs from the JSON's height and width"),
    "duplicate_image": ("images", "warning", "images with identical decoded pixels (pairs: first, copy)"),
    "near_duplicate_image": ("images", "warning", "images whose 64-bit pHash differ in at most {phash_distance} bits"),
    # leakage: duplicates whose members are in different splits (pairs of [split, image id])
    "leaked_image": ("leakage", "error", "identical images in different splits"),
    "leaked_near_duplicate": ("leakage", "warning", "near-duplicate images in different splits"),
}

INSTANCES_ONLY = ("duplicate_ann_id", "missing_geometry", "mask_out_of_bounds", "self_overlap", "near_duplicate_mask")
GROUPS = ("structure", "quality", "distribution", "compatibility", "masks", "panoptic", "images", "leakage")


@dataclass(frozen=True)
class HealthSettings:
    """The checks' thresholds."""

    near_duplicate_iou: float = 0.95
    """Same-image, same-class pairs above this box IoU (hotcoco) or mask IoU are near duplicates."""
    max_aspect_ratio: float = 20.0
    """Boxes longer than this many times their width, or wider (hotcoco's 20:1)."""
    low_instances: int = 10
    """Categories with fewer instances are warned about (hotcoco's 10)."""
    self_overlap: float = 0.5
    """An instance's polygon with more than this share inside another of its polygons is drawn twice (parts that
    touch share edge pixels: up to a quarter of synth's tiniest heads on their bodies)."""
    phash_distance: int = 8
    """Images whose 64-bit pHash differ in at most this many bits are near duplicates. Re-encoding at another
    JPEG quality or brightening moves synth's images 0 bits, a 2% shift 6; distinct synth scenes differ in 20 or
    more, unrelated images in 32 on average; two random hashes come within 8 bits once in 4e9 pairs."""
    ids_listed: int = 50
    """Each finding lists the first this many ids."""


@dataclass
class Found:
    """What one check found: how many, and the first ids; adds in image order (`+=`)."""

    count: int = 0
    ids: list = field(default_factory=list)
    example: str | None = None  # the first problem's own message, where segpipe validate wrote one
    limit: int = HealthSettings.ids_listed  # ids kept

    def add(self, ident: object, example: str | None = None) -> None:
        self.count += 1
        if len(self.ids) < self.limit:
            self.ids.append(ident)
        if self.example is None:
            self.example = example

    def __iadd__(self, other: Found) -> Found:
        self.count += other.count
        self.ids = (self.ids + other.ids)[:self.limit]
        self.example = self.example if self.example is not None else other.example
        return self


@dataclass(frozen=True)
class Fingerprint:
    """One readable image: its pixels' sha256 (decoded RGB and shape, so re-encodings of the same pixels
    match) and its 64-bit perceptual hash (imagehash.phash)."""

    image_id: int
    sha256: str
    phash: int


@dataclass
class HealthShard:
    """What one worker sees."""

    images: list[dict]  # COCO image dicts of this shard (id, file_name, height, width, ...), as in the JSON
    annotations: list[dict]  # the JSON annotations of those images (panoptic: one per image, with segments_info)
    kind: str  # "instances" or "panoptic"
    categories: list[dict]
    image_root: str | None  # folder, tar shards or Parquet (any fsspec URI); None: no image-file checks
    png_root: str | None  # panoptic PNG folder; None: no PNG checks
    split: str  # the split this shard belongs to (for leakage)


@dataclass
class HealthPart:
    """One shard's findings and image fingerprints; parts of one split add (`+=`, in image order) once their
    fingerprints are written to the scratch folder (`spill`)."""

    split: str
    found: dict[str, Found]
    checked: list[str]
    fingerprints: list[Fingerprint]
    hashed: int = 0  # fingerprints written to the scratch folder

    def __iadd__(self, other: HealthPart) -> HealthPart:
        if other.split != self.split or self.fingerprints or other.fingerprints:
            raise ValueError("health parts add within a split, after their fingerprints are spilled")
        for check, f in other.found.items():
            if check in self.found:
                self.found[check] += f
            else:
                self.found[check] = f
        self.checked = list(dict.fromkeys(self.checked + other.checked))
        self.hashed += other.hashed
        return self


def hashes_kind(split: str) -> str:
    """The scratch folder's kind of record holding a split's image fingerprints."""
    return "hashes-" + quote(split, safe="")


def spill(part: HealthPart, parts: Parts, shard: int) -> HealthPart:
    """The part with its fingerprints written to `parts` (in image-id order) instead: what the duplicate search
    reads back a chunk at a time."""
    ordered = sorted(part.fingerprints, key=lambda f: f.image_id)
    parts.write(hashes_kind(part.split), shard, pa.table({
        "image_id": pa.array([f.image_id for f in ordered], pa.int64()),
        "sha256": pa.array([bytes.fromhex(f.sha256) for f in ordered], pa.binary(32)),
        "phash": pa.array([f.phash for f in ordered], pa.uint64())}))
    return replace(part, fingerprints=[], hashed=len(ordered))


class _Findings(dict):
    """check name -> Found, filled as problems turn up."""

    def __init__(self, settings: HealthSettings):
        super().__init__()
        self.limit = settings.ids_listed

    def add(self, check: str, ident: object, example: str | None = None) -> None:
        self.setdefault(check, Found(limit=self.limit)).add(ident, example)


def _names(groups: tuple[str, ...], kind: str) -> list[str]:
    """The checks of `groups` that apply to a `kind` of file."""
    return [name for name, (group, _, _) in CHECKS.items()
            if group in groups and (kind == "instances" or name not in INSTANCES_ONLY)]


def _is_box(bbox: object) -> bool:
    return isinstance(bbox, list) and len(bbox) == 4 and all(validate._is_number(v) for v in bbox)


# --- whole-file checks: ids and counts, no pixels ----------------------------------------------


def global_checks(coco: dict, kind: str, split: str = "", predictions: list[dict] | None = None,
                  settings: HealthSettings = HealthSettings()) -> dict:
    """The checks that need every id of a COCO file (duplicates, orphans, category counts); no pixels read.

    `predictions`, a COCO results list, adds hotcoco's GT/DT compatibility checks.
    """
    found = _Findings(settings)
    images, annotations, categories = coco["images"], coco["annotations"], coco["categories"]
    _duplicates(found, "duplicate_image_id", images)
    _duplicates(found, "duplicate_category_id", categories)
    for problem in validate._check_images("", images):
        if "duplicate" not in problem.message:
            check = "zero_dimensions" if re.search(r"'(height|width)' is", problem.message) else "bad_image_record"
            found.add(check, problem.image_id, problem.message)
    for problem in validate._check_categories("", categories, kind)[1]:
        if "duplicate" not in problem.message:
            found.add("bad_category_record", None, problem.message)
    image_ids = {im.get("id") for im in images if isinstance(im, dict)}
    category_ids = {c.get("id") for c in categories if isinstance(c, dict)}
    counts = {c: 0 for c in category_ids}
    if kind == "instances":
        _duplicates(found, "duplicate_ann_id", annotations)
        for ann in annotations:
            if ann.get("image_id") not in image_ids:
                found.add("orphan_image_id", ann.get("id"))
            if ann.get("category_id") not in category_ids:
                found.add("orphan_category_id", ann.get("id"))
            else:
                counts[ann["category_id"]] += 1
            if all(ann.get(key) is None for key in ("bbox", "segmentation", "keypoints")):
                found.add("missing_geometry", ann.get("id"))
        annotated = {ann.get("image_id") for ann in annotations}
    else:
        for ann in annotations:
            if ann.get("image_id") not in image_ids:
                found.add("orphan_image_id", ann.get("image_id"))
            for segment in ann.get("segments_info") or ():
                if segment.get("category_id") not in category_ids:
                    found.add("orphan_category_id", [ann.get("image_id"), segment.get("id")])
                else:
                    counts[segment["category_id"]] += 1
        annotated = {ann.get("image_id") for ann in annotations if ann.get("segments_info")}
    for category_id, n in sorted(counts.items(), key=lambda item: str(item[0])):
        if n == 0:
            found.add("zero_instance_category", category_id)
        elif n < settings.low_instances:
            found.add("low_instance_category", category_id)
    checked = _names(("structure", "distribution"), kind)
    if predictions is not None:
        _compatibility(found, predictions, image_ids, category_ids)
        checked += _names(("compatibility",), kind)
    nonzero = [n for n in counts.values() if n]
    summary = {"images": len(images), "annotations": len(annotations), "categories": len(categories),
               "images_without_annotations": len(image_ids - annotated),
               "imbalance_ratio": max(nonzero) / min(nonzero) if len(nonzero) >= 2 else 1.0}
    return {"split": split, "found": dict(found), "checked": checked, "summary": summary}


def _duplicates(found: _Findings, check: str, items: list) -> None:
    """Each id again after its first appearance (hotcoco's find_duplicate_ids)."""
    seen = set()
    for item in items:
        ident = item.get("id") if isinstance(item, dict) else None
        if ident is None or isinstance(ident, (list, dict)):
            continue
        if ident in seen:
            found.add(check, ident)
        seen.add(ident)


def _compatibility(found: _Findings, predictions: list[dict], image_ids: set, category_ids: set) -> None:
    for number, detection in enumerate(predictions, start=1):
        if detection.get("image_id") not in image_ids:
            found.add("dt_orphan_image_id", number)
        if detection.get("category_id") not in category_ids:
            found.add("dt_orphan_category_id", number)
        score = detection.get("score")
        if score is None:
            found.add("dt_missing_score", number)
        elif not 0.0 <= score <= 1.0:
            found.add("dt_score_out_of_range", number)


# --- per-shard checks: boxes, masks, PNGs, image files ------------------------------------------


def shard_checks(shard: HealthShard, settings: HealthSettings = HealthSettings()) -> HealthPart:
    """The checks one shard of images allows: boxes, masks, panoptic PNGs, image files and their hashes."""
    found = _Findings(settings)
    checked = _names(("quality",), shard.kind)
    sizes = {im["id"]: validate._image_size({im["id"]: im}, im["id"]) for im in shard.images
             if isinstance(im, dict) and "id" in im}
    if shard.kind == "instances":
        _instance_checks(found, shard.annotations, sizes, settings)
        checked += _names(("masks",), shard.kind)
    else:
        _panoptic_checks(found, shard, settings)
        checked += (_names(("masks", "panoptic"), shard.kind) if shard.png_root is not None
                    else ["bad_segment_id", "duplicate_segment_id"])
    fingerprints = []
    if shard.image_root is not None:
        fingerprints = _image_checks(found, shard.images, shard.image_root)
        checked += ["image_missing", "image_unreadable", "image_size_mismatch"]
    return HealthPart(shard.split, dict(found), checked, fingerprints)


def _box_checks(found: _Findings, ident: object, ann: dict, size: tuple[int, int] | None,
                settings: HealthSettings) -> bool:
    """hotcoco's quality checks of one box; False for a degenerate box (left out of near duplicates)."""
    bbox = ann.get("bbox")
    if not _is_box(bbox):
        return False
    x, y, w, h = bbox
    if w <= 0 or h <= 0:
        found.add("degenerate_bbox", ident)
        return False
    if ann.get("area") == 0:
        found.add("zero_area", ident)
    # hotcoco checks the right and bottom edges only; a box starting left of or above the image is out too.
    if size is not None and (x < 0 or y < 0 or x + w > size[1] or y + h > size[0]):
        found.add("bbox_out_of_bounds", ident)
    if max(w / h, h / w) > settings.max_aspect_ratio:
        found.add("extreme_aspect_ratio", ident)
    return True


def _near_duplicates(found: _Findings, check: str, idents: list, ious: np.ndarray, threshold: float) -> None:
    """Both members of every pair above `threshold` (hotcoco lists the annotation ids, each once)."""
    upper = np.triu(ious > threshold, k=1)
    for k in np.flatnonzero(upper.any(axis=0) | upper.any(axis=1)):
        found.add(check, idents[k])


def _instance_checks(found: _Findings, annotations: list[dict], sizes: dict, settings: HealthSettings) -> None:
    boxes, masks = defaultdict(list), defaultdict(list)  # (image, category) -> [(id, box)], [(id, rle)]
    for ann in annotations:
        ident, size = ann.get("id"), sizes.get(ann.get("image_id"))
        if ann.get("bbox") is None and ann.get("segmentation") is None:
            continue  # missing_geometry, from global_checks: nothing here to measure
        key = (ann.get("image_id"), ann.get("category_id"))
        if _box_checks(found, ident, ann, size, settings):
            boxes[key].append((ident, ann["bbox"]))
        segmentation = ann.get("segmentation")
        rle = polygons = None
        if segmentation is not None:
            error, rle, polygons = validate._decode_segmentation(segmentation, size)
            if error:
                found.add("broken_mask", ident, error)
                continue
        for message in validate._measure_problems(ann, rle, polygons):
            check = ("area_mask_mismatch" if message.startswith("area ") else
                     "box_mask_mismatch" if message.startswith("bbox ") else "bad_annotation_field")
            found.add(check, ident, message)
        if rle is None:
            continue
        if not mask_utils.area(rle):
            found.add("empty_mask", ident)
            continue
        if polygons is not None:
            _polygon_checks(found, ident, polygons, size, settings.self_overlap)
        masks[key].append((ident, rle))
    for group in boxes.values():
        if len(group) > 1:  # hotcoco skips groups over 100 boxes; one vectorised call has no such limit
            xywh = np.asarray([b for _, b in group], float)
            ious = mask_utils.iou(xywh, xywh, np.zeros(len(group), np.uint8))
            _near_duplicates(found, "near_duplicate", [i for i, _ in group], ious, settings.near_duplicate_iou)
    for group in masks.values():
        if len(group) > 1:
            rles = [r for _, r in group]
            ious = mask_utils.iou(rles, rles, np.zeros(len(group), np.uint8))
            _near_duplicates(found, "near_duplicate_mask", [i for i, _ in group], ious, settings.near_duplicate_iou)


def _polygon_checks(found: _Findings, ident: object, polygons: list, size: tuple[int, int], self_overlap: float) -> None:
    coords = np.concatenate([np.asarray(p, float) for p in polygons])
    xs, ys = coords[0::2], coords[1::2]
    if xs.min() < 0 or ys.min() < 0 or xs.max() > size[1] or ys.max() > size[0]:
        found.add("mask_out_of_bounds", ident)
    if len(polygons) > 1:
        # Parts that touch share a few edge pixels (synth's person: head on body, up to a quarter of a tiny head);
        # a part lying mostly inside another is a polygon drawn twice. With iscrowd=1, pycocotools' IoU is
        # |a ∩ b| / |a|: the share of part a inside part b.
        parts = mask_utils.frPyObjects(polygons, *size)
        inside = mask_utils.iou(parts, parts, np.ones(len(parts), np.uint8))
        np.fill_diagonal(inside, 0)
        if inside.max() > self_overlap:
            found.add("self_overlap", ident)


# segpipe validate's panoptic messages -> check names, first match wins. Orphan images and unknown categories
# are left to global_checks, which sees every id.
_PANOPTIC_MESSAGES = [
    (r"image_id is not in 'images'|unknown category_id", None),
    (r"'iscrowd' is", "bad_annotation_field"),
    (r"is not in 1\.\.", "bad_segment_id"),
    (r"duplicate segment id", "duplicate_segment_id"),
    (r"PNG is \d+x\d+ \(HxW\), the image is", "png_size_mismatch"),
    (r"segment in the PNG is not in segments_info", "unlisted_segment"),
    (r"has no pixels in the PNG", "empty_mask"),
    (r"^area .* disagrees with the PNG", "area_mask_mismatch"),
    (r"^bbox .* disagrees with the PNG", "box_mask_mismatch"),
    (r"more than one annotation|no panoptic annotation|segments_info' is not|no 'file_name'|escapes its folder",
     "panoptic_annotation"),
    (r"", "png_unreadable"),  # what is left comes from reading the PNG
]


def _panoptic_checks(found: _Findings, shard: HealthShard, settings: HealthSettings) -> None:
    images = {im["id"]: im for im in shard.images}
    categories = {c["id"]: c for c in shard.categories}
    for ann in shard.annotations:
        size = validate._image_size(images, ann.get("image_id"))
        for segment in ann.get("segments_info") or ():
            _box_checks(found, [ann.get("image_id"), segment.get("id")], segment, size, settings)
    if shard.png_root is not None:
        problems = validate._check_panoptic("", shard.annotations, images, categories, shard.png_root)
    else:
        problems = (p for ann in shard.annotations if isinstance(ann.get("segments_info"), list)
                    for p in validate._check_segments_info("", ann.get("image_id"), ann["segments_info"], categories))
    for problem in problems:
        check = next(check for pattern, check in _PANOPTIC_MESSAGES if re.search(pattern, problem.message))
        if check is not None:
            ident = problem.image_id if problem.segment_id is None else [problem.image_id, problem.segment_id]
            found.add(check, ident, problem.message)


def _image_checks(found: _Findings, images: list[dict], root: str) -> list[Fingerprint]:
    by_name = {im["file_name"]: im for im in images if isinstance(im.get("file_name"), str)}
    fingerprints, seen = [], set()
    for record in read_named(root, set(by_name)):
        name, image = record.key, by_name[record.key]
        seen.add(name)
        try:
            rgb = decode_image(record.data)
        except ImageDecodeError as error:
            found.add("image_unreadable", image["id"], f"{name}: {error}")
            continue
        if rgb.shape[:2] != (image.get("height"), image.get("width")):
            found.add("image_size_mismatch", image["id"], f"{name}: the file is {rgb.shape[0]}x{rgb.shape[1]} "
                                                          f"(HxW), the JSON says {image.get('height')}x{image.get('width')}")
        digest = hashlib.sha256(np.asarray(rgb.shape, np.int64).tobytes() + rgb.tobytes()).hexdigest()
        fingerprints.append(Fingerprint(image["id"], digest, int(str(imagehash.phash(Image.fromarray(rgb))), 16)))
    for image in images:
        if image.get("file_name") in by_name and image["file_name"] not in seen:
            found.add("image_missing", image["id"], image["file_name"])
    return fingerprints


# --- merge: parts in image order, duplicates and leakage across shards and splits ---------------


def merge(global_result: dict | list[dict], parts: list[HealthPart], hashes: Parts, splits: list[str] | None = None,
          settings: HealthSettings = HealthSettings()) -> dict:
    """The JSON-ready "health" section of global_checks' result (one per GT file: a list when several) and the
    shards' parts (in image order within each split), their fingerprints spilled to `hashes`. `splits` orders
    the splits (default: as given)."""
    results = [global_result] if isinstance(global_result, dict) else list(global_result)
    order = list(splits or dict.fromkeys([r["split"] for r in results] + [p.split for p in parts]))
    found: dict[tuple[str, str | None], Found] = defaultdict(lambda: Found(limit=settings.ids_listed))  # (check, split)
    checked = set()
    for source in [*results, *(vars(p) for p in parts)]:
        checked.update(source["checked"])
        for check, f in source["found"].items():
            found[check, source["split"]] += f
    if any(p.hashed for p in parts):
        checked.update(["duplicate_image", "near_duplicate_image"] + (["leaked_image", "leaked_near_duplicate"]
                                                                      if len(order) > 1 else []))
        found.update(image_duplicates(hashes, order, settings, HASH_ROWS))
    findings = []
    for check, (group, severity, detail) in CHECKS.items():
        for split in [*order, None]:
            f = found.get((check, split))
            if f is None or not f.count:
                continue
            line = detail.format(**vars(settings)) + (f"; first: {f.example}" if f.example else "")
            findings.append({"check": check, "group": group, "severity": severity, "split": split,
                             "count": f.count, "ids": f.ids, "detail": line})
    counts = {group: sum(f["count"] for f in findings if f["group"] == group) for group in GROUPS
              if any(CHECKS[c][0] == group for c in checked)}
    return {"findings": findings, "counts": counts, "checked": [c for c in CHECKS if c in checked],
            "summary": {r["split"]: r["summary"] for r in results}}


HASH_ROWS = 1 << 16
"""Fingerprints the duplicate search holds at once (two chunks of them, compared 2^20 pairs at a time)."""


def image_duplicates(hashes: Parts, order: list[str], settings: HealthSettings = HealthSettings(),
                     rows: int = HASH_ROWS) -> dict[tuple[str, str | None], Found]:
    """Exact duplicates (same pixels' sha256) and near ones (pHash within the threshold), within a split or
    across splits (leakage), over the fingerprints of the splits in `order` (each in image-id order).
    Ids: pairs [first, copy] within a split; [[split, id], [split, id]] across.

    Every chunk of fingerprints is compared with every chunk, so memory holds two chunks whatever the number of
    images. Identical pixels have identical pHashes, so exact duplicates are among the pairs at distance 0. Each
    finding keeps its count and its first ids in the order of a sort of all fingerprints by (split, image id):
    exact duplicates by (the group's first image, the copy), near ones by (image, later image)."""
    kept = _FirstIds(settings.ids_listed)
    for a in _hash_chunks(hashes, order, rows):
        first = _Earliest(len(a["phash"]))  # each image's first identical image
        first_here = _Earliest(len(a["phash"]))  # and its first identical image in its own split
        for b in _hash_chunks(hashes, order, rows):
            block = max(1, (1 << 20) // len(b["phash"]))  # pairs compared at once: about 8 MiB of XORs
            for lo in range(0, len(a["phash"]), block):
                distance = np.bitwise_count(a["phash"][lo:lo + block, None] ^ b["phash"][None, :])
                i, j = np.nonzero(distance <= settings.phash_distance)
                same = (distance[i, j] == 0) & (a["sha256"][lo + i] == b["sha256"][j]).all(axis=1)
                i += lo
                gi, gj = a["position"][i], b["position"][j]
                earlier = same & (gj < gi)
                first.lower(i[earlier], j[earlier], b)
                here = earlier & (a["split"][i] == b["split"][j])
                first_here.lower(i[here], j[here], b)
                for k in np.flatnonzero(~same & (gj > gi)):
                    si, sj = order[a["split"][i[k]]], order[b["split"][j[k]]]
                    pair = int(a["image_id"][i[k]]), int(b["image_id"][j[k]])
                    if si == sj:
                        kept.add(("near_duplicate_image", si), (gi[k], gj[k]), list(pair))
                    else:
                        kept.add(("leaked_near_duplicate", None), (gi[k], gj[k]), [[si, pair[0]], [sj, pair[1]]])
            kept.trim()
        for k in np.flatnonzero(first.position < a["position"]):
            split, image_id, key = order[a["split"][k]], int(a["image_id"][k]), (first.position[k], a["position"][k])
            if first_here.position[k] < a["position"][k]:
                kept.add(("duplicate_image", split), key, [int(first_here.image_id[k]), image_id])
            else:
                kept.add(("leaked_image", None), key, [[order[first.split[k]], int(first.image_id[k])], [split, image_id]])
        kept.trim()
    return kept.found()


def _hash_chunks(hashes: Parts, order: list[str], rows: int):
    """The fingerprints of the splits in `order`, about `rows` at a time, with their positions in that order."""
    start = 0
    for rank, split in enumerate(order):
        for table in hashes.chunks(hashes_kind(split), rows=rows):
            n = table.num_rows
            sha = table.column("sha256").combine_chunks()
            yield {"start": start, "position": np.arange(start, start + n), "split": np.full(n, rank),
                   "image_id": table.column("image_id").to_numpy(), "phash": table.column("phash").to_numpy(),
                   "sha256": np.frombuffer(sha.buffers()[1], np.uint8, n * 32, sha.offset * 32).reshape(n, 32)}
            start += n


class _Earliest:
    """Per image of a chunk: the earliest (position, id, split) of the images paired with it so far."""

    def __init__(self, n: int):
        self.position = np.full(n, np.iinfo(np.int64).max)
        self.image_id, self.split = np.zeros(n, np.int64), np.zeros(n, np.int64)

    def lower(self, i: np.ndarray, j: np.ndarray, chunk: dict) -> None:
        """Pairs (i in this chunk, j in `chunk`)."""
        earliest = np.full(len(self.position), np.iinfo(np.int64).max)
        np.minimum.at(earliest, i, chunk["position"][j])
        better = earliest < self.position
        where = earliest[better] - chunk["start"]
        self.position[better] = earliest[better]
        self.image_id[better], self.split[better] = chunk["image_id"][where], chunk["split"][where]


class _FirstIds:
    """Per finding: how many were added, and the ids of the `limit` smallest keys."""

    def __init__(self, limit: int):
        self.limit = limit
        self.counts: dict = defaultdict(int)
        self.items: dict = defaultdict(list)

    def add(self, finding: tuple, key: tuple, ids: list) -> None:
        self.counts[finding] += 1
        self.items[finding].append((key, ids))

    def trim(self) -> None:
        for items in self.items.values():
            items.sort(key=lambda item: item[0])
            del items[self.limit:]

    def found(self) -> dict[tuple, Found]:
        self.trim()
        return {f: Found(self.counts[f], [ids for _, ids in items], limit=self.limit) for f, items in self.items.items()}
