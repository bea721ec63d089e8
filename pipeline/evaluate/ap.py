"""COCO AP with the semantics of pycocotools' COCOeval, from per-image statistics that add, without per-image Python."""

from __future__ import annotations

import functools
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass, replace

import numba
import numpy as np
import pyarrow as pa
from pycocotools import mask as mask_utils

from pipeline.errors import SegpipeError
from pipeline.evaluate.match import RleError, Runs, decode_arrow, decode_strings, index_of, pair_intersections
from pipeline.evaluate import check_integer_ids, refuse_strays
from pipeline.evaluate.runner import map_shards, without_cyclic_gc
from pipeline.io.fs import read_json
from pipeline.io.tables import is_dataset_table, open_dataset_table, parquet_files, read_columns, read_rows
from pipeline.progress import Progress, per_shard, quiet

# COCOeval's parameters for segm and bbox, built the way pycocotools builds them (the same floats).
IOU_THRESHOLDS = np.linspace(0.5, 0.95, int(np.round((0.95 - 0.5) / 0.05)) + 1, endpoint=True)
RECALL_THRESHOLDS = np.linspace(0.0, 1.00, int(np.round((1.00 - 0.0) / 0.01)) + 1, endpoint=True)
MAX_DETS = (1, 10, 100)
AREA_RANGES = ((0, 1e5**2), (0, 32**2), (32**2, 96**2), (96**2, 1e5**2))  # all, small, medium, large
STAT_NAMES = ("AP", "AP50", "AP75", "APs", "APm", "APl", "AR1", "AR10", "AR100", "ARs", "ARm", "ARl")
# (precision or recall, IoU threshold index or None for all, area index, maxDets index): COCOeval.summarize.
_STATS = ((True, None, 0, 2), (True, 0, 0, 2), (True, 5, 0, 2), (True, None, 1, 2), (True, None, 2, 2),
          (True, None, 3, 2), (False, None, 0, 0), (False, None, 0, 1), (False, None, 0, 2),
          (False, None, 1, 2), (False, None, 2, 2), (False, None, 3, 2))


@dataclass(frozen=True)
class Instances:
    """Ground truth or detections of a batch of images, flat: image by image, file order within an image."""

    image: np.ndarray  # the image's id, non-decreasing
    category: np.ndarray  # position in the sorted category ids
    area: np.ndarray  # float64, the area COCOeval ranges by (ground truth: the file's; detections: loadRes's)
    box: np.ndarray  # (n, 4) COCO [x, y, w, h]
    crowd: np.ndarray  # ground truth: iscrowd; detections: all False
    score: np.ndarray  # detections: score; ground truth: ones
    counts_as_match: np.ndarray  # ground truth: id != 0 (COCOeval stores the id, so id 0 reads as no match)
    masks: Runs | None  # segm only: each instance's mask as RLE runs

    def __len__(self) -> int:
        return len(self.category)


@dataclass
class Statistics:
    """What a run of images contributes to AP: COCOeval's evaluateImg output, as flat arrays that add.

    One entry per kept detection (the top 100 by score of each image and category), in image order
    and, within an image and category, in COCOeval's order: `matched` and `ignored` are (areas,
    thresholds, detections) flags. `positives` counts non-ignored ground truth per (category, area).
    Adding two statistics of disjoint images merges them in image-id order, so shards, workers and
    ranks add up in any order to the same statistics.
    """

    image: np.ndarray
    category: np.ndarray
    score: np.ndarray
    rank: np.ndarray  # position within its image and category, by score
    matched: np.ndarray
    ignored: np.ndarray
    positives: np.ndarray

    @classmethod
    def zeros(cls, n_categories: int) -> Statistics:
        flags = np.zeros((len(AREA_RANGES), len(IOU_THRESHOLDS), 0), bool)
        empty = np.zeros(0, np.int64)
        return cls(empty, empty, np.zeros(0), empty, flags, flags, np.zeros((n_categories, len(AREA_RANGES)), np.int64))

    def __iadd__(self, other: Statistics) -> Statistics:
        image = np.concatenate([self.image, other.image])
        order = None
        if len(self.image) and len(other.image) and other.image[0] < self.image[-1]:
            order = np.argsort(image, kind="stable")  # not in image order: merge (images are disjoint)
        take = (lambda a, axis=0: a if order is None else np.take(a, order, axis=axis))
        self.image = take(image)
        self.category = take(np.concatenate([self.category, other.category]))
        self.score = take(np.concatenate([self.score, other.score]))
        self.rank = take(np.concatenate([self.rank, other.rank]))
        self.matched = take(np.concatenate([self.matched, other.matched], axis=2), 2)
        self.ignored = take(np.concatenate([self.ignored, other.ignored], axis=2), 2)
        self.positives = self.positives + other.positives
        return self


def batch_statistics(truths: Instances, dets: Instances, iou_type: str, n_categories: int) -> Statistics:
    """COCOeval.evaluateImg for a batch of images: every image, category, area range and threshold at once.

    Categories never interact (a detection only meets ground truth of its class), so each (image,
    category) group is matched on its own, greedily, in COCOeval's order; one compiled pass does all groups.
    """
    # Detections by (image, category, score), stable so that ties keep file order; the top 100 of each group.
    order = np.lexsort((-dets.score, dets.category, dets.image))
    group_key = _group_key(dets.image[order], dets.category[order], n_categories)
    starts = np.flatnonzero(np.r_[True, group_key[1:] != group_key[:-1]]) if len(order) else np.zeros(0, np.int64)
    rank = np.arange(len(order)) - np.repeat(starts, np.diff(np.r_[starts, len(order)]))
    kept = order[rank < MAX_DETS[-1]]
    rank = rank[rank < MAX_DETS[-1]]
    d_key = _group_key(dets.image[kept], dets.category[kept], n_categories)
    g_order = np.lexsort((truths.category, truths.image))
    g_key = _group_key(truths.image[g_order], truths.category[g_order], n_categories)
    # Groups holding both detections and ground truth are the ones that can match.
    keys = np.intersect1d(d_key, g_key)
    d_lo, d_hi = np.searchsorted(d_key, keys), np.searchsorted(d_key, keys, "right")
    g_lo, g_hi = np.searchsorted(g_key, keys), np.searchsorted(g_key, keys, "right")
    pair_offsets = np.zeros(len(keys) + 1, np.int64)
    np.cumsum((d_hi - d_lo) * (g_hi - g_lo), out=pair_offsets[1:])
    d_pairs, g_pairs = _pairs(d_lo, d_hi, g_lo, g_hi, pair_offsets)  # positions in kept / g_order, row-major
    ious = _ious(dets, truths, kept[d_pairs], g_order[g_pairs], iou_type)

    gt_ignored = truths.crowd[None, :] | (truths.area[None, :] < _LOW) | (truths.area[None, :] > _HIGH)  # (A, G)
    matched, ignored = _match(d_lo, d_hi, g_lo, g_hi, pair_offsets, ious, np.ascontiguousarray(gt_ignored[:, g_order]),
                              truths.crowd[g_order], truths.counts_as_match[g_order], len(kept),
                              np.minimum(IOU_THRESHOLDS, 1 - 1e-10))
    outside = (dets.area[kept][None, :] < _LOW) | (dets.area[kept][None, :] > _HIGH)  # (A, D)
    ignored |= ~matched & outside[:, None, :]
    positives = np.stack([np.bincount(truths.category[~gt_ignored[a]], minlength=n_categories)
                          for a in range(len(AREA_RANGES))], axis=1)
    return Statistics(dets.image[kept], dets.category[kept], dets.score[kept], rank, matched, ignored, positives)


def _group_key(image: np.ndarray, category: np.ndarray, n_categories: int) -> np.ndarray:
    """One sortable number per (image, category): image ids are non-negative in COCO, but any int64 works."""
    return image.astype(np.int64) * n_categories + category


_LOW = np.asarray([a[0] for a in AREA_RANGES], np.float64)[:, None]
_HIGH = np.asarray([a[1] for a in AREA_RANGES], np.float64)[:, None]


@numba.njit("UniTuple(i8[:], 2)(i8[:], i8[:], i8[:], i8[:], i8[:])", cache=True, nogil=True)
def _pairs(d_lo, d_hi, g_lo, g_hi, offsets):
    """Every (detection, ground truth) pair of every group, detection-major, as COCOeval's IoU matrices."""
    d = np.empty(offsets[-1], np.int64)
    g = np.empty(offsets[-1], np.int64)
    for k in range(len(d_lo)):
        q = offsets[k]
        for i in range(d_lo[k], d_hi[k]):
            for j in range(g_lo[k], g_hi[k]):
                d[q], g[q] = i, j
                q += 1
    return d, g


def _ious(dets: Instances, truths: Instances, d: np.ndarray, g: np.ndarray, iou_type: str) -> np.ndarray:
    """IoU of each (detection, ground truth) pair, as pycocotools' maskUtils.iou computes it, to the bit."""
    crowd = truths.crowd[g]
    if iou_type == "bbox":
        return _box_ious(dets.box[d], truths.box[g], crowd)
    # rleIou: intersection / union counted from the runs; a crowd's union is the detection's area. Pairs whose
    # column ranges do not meet share no pixel, so only the others walk their runs.
    d_columns, g_columns = column_ranges(dets.masks)[d], column_ranges(truths.masks)[g]
    meet = (d_columns[:, 0] <= g_columns[:, 1]) & (g_columns[:, 0] <= d_columns[:, 1])
    shared = np.zeros(len(d), np.int64)
    shared[meet] = pair_intersections(dets.masks, truths.masks, d[meet], g[meet])
    d_area, g_area = dets.masks.areas[d], truths.masks.areas[g]
    union = np.where(crowd, d_area, d_area + g_area - shared)
    with np.errstate(divide="ignore", invalid="ignore"):
        return np.where(shared > 0, shared / np.where(shared > 0, union, 1), 0.0)


def _box_ious(d: np.ndarray, g: np.ndarray, crowd: np.ndarray) -> np.ndarray:
    """pycocotools' bbIou, pair by pair in the same arithmetic, so results agree to the bit."""
    w = np.minimum(d[:, 2] + d[:, 0], g[:, 2] + g[:, 0]) - np.maximum(d[:, 0], g[:, 0])
    h = np.minimum(d[:, 3] + d[:, 1], g[:, 3] + g[:, 1]) - np.maximum(d[:, 1], g[:, 1])
    inter = w * h
    d_area, g_area = d[:, 2] * d[:, 3], g[:, 2] * g[:, 3]
    union = np.where(crowd, d_area, d_area + g_area - inter)
    with np.errstate(divide="ignore", invalid="ignore"):
        return np.where((w > 0) & (h > 0), inter / union, 0.0)


@numba.njit("UniTuple(b1[:, :, :], 2)(i8[:], i8[:], i8[:], i8[:], i8[:], f8[:], b1[:, :], b1[:], b1[:], i8, f8[:])",
            cache=True, nogil=True)
def _match(d_lo, d_hi, g_lo, g_hi, offsets, ious, gt_ignored, gt_crowd, gt_counts, n_det, thresholds):
    """COCOeval.evaluateImg's greedy matching, loop for loop, for every group, area range and threshold.

    Ground truth is visited ignored-last (a stable sort, per area range); a detection takes the best
    ground truth not yet taken (crowds can be taken again) whose IoU reaches the threshold, later ones
    winning ties, and stops at the ignored ones once it holds a regular one.
    """
    n_area, n_thr = gt_ignored.shape[0], len(thresholds)
    matched = np.zeros((n_area, n_thr, n_det), np.bool_)
    ignored = np.zeros((n_area, n_thr, n_det), np.bool_)
    for k in range(len(d_lo)):
        n_g = g_hi[k] - g_lo[k]
        visit = np.empty(n_g, np.int64)
        taken = np.zeros(n_g, np.bool_)
        for a in range(n_area):
            q = 0
            for ignored_pass in (False, True):
                for j in range(n_g):
                    if gt_ignored[a, g_lo[k] + j] == ignored_pass:
                        visit[q] = j
                        q += 1
            for t in range(n_thr):
                taken[:] = False
                for i in range(d_hi[k] - d_lo[k]):
                    best, m = thresholds[t], -1
                    row = offsets[k] + i * n_g
                    for j in visit:
                        g = g_lo[k] + j
                        if taken[j] and not gt_crowd[g]:
                            continue
                        if m > -1 and not gt_ignored[a, g_lo[k] + m] and gt_ignored[a, g]:
                            break
                        if ious[row + j] < best:
                            continue
                        best, m = ious[row + j], j
                    if m == -1:
                        continue
                    taken[m] = True
                    matched[a, t, d_lo[k] + i] = gt_counts[g_lo[k] + m]
                    ignored[a, t, d_lo[k] + i] = gt_ignored[a, g_lo[k] + m]
    return matched, ignored


def column_ranges(masks: Runs) -> np.ndarray:
    """(n, 2) first and last column of each mask's pixels (an empty mask gets an empty range)."""
    return _column_ranges(masks.lengths, masks.offsets, masks.heights)


@numba.njit("i8[:, :](i8[:], i8[:], i8[:])", cache=True, nogil=True)
def _column_ranges(lengths, offsets, heights):
    out = np.empty((len(offsets) - 1, 2), np.int64)
    for i in range(len(offsets) - 1):
        first, last, position = np.int64(-1), np.int64(-2), np.int64(0)
        for r in range(offsets[i], offsets[i + 1]):
            if (r - offsets[i]) % 2 == 1 and lengths[r] > 0:
                if first < 0:
                    first = position
                last = position + lengths[r] - 1
            position += lengths[r]
        out[i, 0], out[i, 1] = (first // heights[i], last // heights[i]) if first >= 0 else (1, 0)
    return out


def accumulate(stats: Statistics, n_categories: int) -> tuple[np.ndarray, np.ndarray]:
    """COCOeval.accumulate: precision (T, R, K, A, M) and recall (T, K, A, M), -1 where undefined.

    `stats` must be in image order (sorted image ids): one stable sort by category, then score, puts
    each category's detections in COCOeval's order, tied scores included.
    """
    order = np.lexsort((-stats.score, stats.category))
    bounds = np.searchsorted(stats.category[order], np.arange(n_categories + 1))
    n_thr, n_rec, n_area, n_max = len(IOU_THRESHOLDS), len(RECALL_THRESHOLDS), len(AREA_RANGES), len(MAX_DETS)
    precision = -np.ones((n_thr, n_rec, n_categories, n_area, n_max))
    recall = -np.ones((n_thr, n_categories, n_area, n_max))
    _fill(order, bounds, stats.rank, np.ascontiguousarray(stats.matched), np.ascontiguousarray(stats.ignored),
          stats.positives, np.asarray(MAX_DETS, np.int64), RECALL_THRESHOLDS, precision, recall)
    return precision, recall


@numba.njit("void(i8[:], i8[:], i8[:], b1[:, :, :], b1[:, :, :], i8[:, :], i8[:], f8[:], f8[:, :, :, :, :], f8[:, :, :, :])",
            cache=True, nogil=True)
def _fill(order, bounds, rank, matched, ignored, positives, max_dets, recall_thresholds, precision, recall):
    """The loops of COCOeval.accumulate over categories, maxDets, area ranges and thresholds, compiled."""
    n_area, n_thr = matched.shape[0], matched.shape[1]
    n_rec = len(recall_thresholds)
    eps = np.spacing(1.0)
    for k in range(len(bounds) - 1):
        entries = order[bounds[k]:bounds[k + 1]]
        for m in range(len(max_dets)):
            kept = entries[rank[entries] < max_dets[m]]
            n_det = len(kept)
            tp = np.empty(n_det)
            pr = np.empty(n_det)
            for a in range(n_area):
                npig = positives[k, a]
                if npig == 0:
                    continue
                for t in range(n_thr):
                    if n_det == 0:
                        recall[t, k, a, m] = 0.0
                        precision[t, :, k, a, m] = 0.0
                        continue
                    tp_sum, fp_sum = 0.0, 0.0
                    for i in range(n_det):
                        d = kept[i]
                        if not ignored[a, t, d]:
                            if matched[a, t, d]:
                                tp_sum += 1.0
                            else:
                                fp_sum += 1.0
                        tp[i] = tp_sum / npig
                        pr[i] = tp_sum / (fp_sum + tp_sum + eps)
                    recall[t, k, a, m] = tp[n_det - 1]
                    for i in range(n_det - 1, 0, -1):  # the precision envelope
                        if pr[i] > pr[i - 1]:
                            pr[i - 1] = pr[i]
                    inds = np.searchsorted(tp, recall_thresholds)  # side="left", as COCOeval
                    for r in range(n_rec):
                        precision[t, r, k, a, m] = pr[inds[r]] if inds[r] < n_det else 0.0


def summarize(precision: np.ndarray, recall: np.ndarray) -> list[float]:
    """The 12 numbers of COCOeval.summarize, in its order."""
    out = []
    for is_precision, thr, area, max_det in _STATS:
        s = precision[..., area, max_det] if is_precision else recall[..., area, max_det]
        if thr is not None:
            s = s[thr:thr + 1]
        valid = s[s > -1]
        out.append(float(np.mean(valid)) if valid.size else -1.0)
    return out


# --- reading COCO files the way COCO() and COCO.loadRes() read them ---------------------------
#
# Files from the wild: where pycocotools reads a field one way, so does segpipe. Where pycocotools
# crashes on a field that has one obvious reading, segpipe reads it that way, which gives
# pycocotools' numbers on the file with that field written out: "segmentation": [] is an empty
# mask, a missing iscrowd is 0, uncompressed RLE is its compressed form. Where the numbers would be
# degenerate or the reading a guess (duplicate ids, a missing area, 1- or 2-point polygons, sizes
# that are not positive, masks for segm where no annotation has one), evaluate_ap refuses with one
# line naming the file and the item.


def truth_instances(annotations: Sequence[dict], sizes: dict, category_index: dict, iou_type: str) -> Instances:
    """Ground truth as COCO() and COCOeval._prepare see it (area from the file, crowds ignored), in image-id
    order, file order within an image; `sizes` maps image id to (height, width)."""
    annotations = sorted(annotations, key=lambda a: a["image_id"])  # stable: file order within an image
    n = len(annotations)
    image = np.fromiter((a["image_id"] for a in annotations), np.int64, n)
    masks = None
    if iou_type == "segm":
        masks = _masks([a["segmentation"] for a in annotations], image, sizes)
    return Instances(image, np.fromiter((category_index[a["category_id"]] for a in annotations), np.int64, n),
                     np.fromiter((a["area"] for a in annotations), np.float64, n),
                     np.asarray([a["bbox"] for a in annotations], np.float64).reshape(n, 4),
                     np.fromiter((bool(a.get("iscrowd", 0)) for a in annotations), bool, n), np.ones(n),
                     np.fromiter((a["id"] != 0 for a in annotations), bool, n), masks)


def loads_as_boxes(results: Sequence[dict]) -> bool:
    """COCO.loadRes's branch, decided by the first result: boxes when it has a non-empty `bbox`."""
    return "bbox" in results[0] and results[0]["bbox"] != []


def detection_instances(results: Sequence[dict], sizes: dict, category_index: dict, iou_type: str,
                        box_branch: bool) -> Instances:
    """Detections as COCO.loadRes prepares them, in image-id order, file order within an image.

    In the box branch (`loads_as_boxes`) every result's area is its box's (w * h), even for segm,
    and a missing segmentation becomes the box polygon; otherwise the area is the mask's.
    """
    # evaluate_ap refused unknown categories unless asked to drop them; COCOeval never looks at them.
    results = sorted((r for r in results if r["category_id"] in category_index), key=lambda r: r["image_id"])
    key = "bbox" if box_branch else "segmentation"
    missing = next((r for r in results if key not in r), None)
    if missing is not None:
        raise SegpipeError(f"a result for image {missing['image_id']} has no '{key}' (the first result has one)")
    n = len(results)
    image = np.fromiter((r["image_id"] for r in results), np.int64, n)
    masks = None
    if box_branch:
        boxes = np.asarray([r["bbox"] for r in results], np.float64).reshape(n, 4)
        areas = boxes[:, 2] * boxes[:, 3]
        if iou_type == "segm":  # loadRes adds the box polygon only where the key is missing
            masks = _masks([r["segmentation"] if "segmentation" in r else _box_polygon(r["bbox"]) for r in results],
                           image, sizes)
    else:
        masks = _masks([r["segmentation"] for r in results], image, sizes)
        areas = masks.areas.astype(np.float64)
        boxes = coco_boxes(masks)
        given = [k for k, r in enumerate(results) if len(r.get("bbox") or ()) == 4]  # else the mask's box, as loadRes
        if given:
            boxes[given] = np.asarray([results[k]["bbox"] for k in given], np.float64).reshape(-1, 4)
    return Instances(image, np.fromiter((category_index[r["category_id"]] for r in results), np.int64, n),
                     areas, boxes, np.zeros(n, bool), np.fromiter((r["score"] for r in results), np.float64, n),
                     np.ones(n, bool), masks if iou_type == "segm" else None)


def _box_polygon(box: Sequence[float]) -> list[list[float]]:
    x, y, w, h = box
    return [[x, y, x, y + h, x + w, y + h, x + w, y]]


def _masks(segmentations: list, image: np.ndarray, sizes: dict) -> Runs:
    """Runs of COCO segmentations, as COCO.annToRLE makes them: compressed RLE as is, uncompressed RLE
    compressed, polygons rasterised by pycocotools (one call per image) and merged, [] an empty mask."""
    strings: list = [None] * len(segmentations)
    heights, pixels = np.zeros(len(image), np.int64), np.zeros(len(image), np.int64)
    k = 0
    while k < len(segmentations):
        end = k
        while end < len(segmentations) and image[end] == image[k]:
            end += 1
        height, width = sizes[int(image[k])]
        heights[k:end], pixels[k:end] = height, height * width
        polygons, owners = [], []
        for i in range(k, end):
            segmentation = segmentations[i]
            if isinstance(segmentation, dict):
                if isinstance(segmentation["counts"], str):
                    strings[i] = segmentation["counts"]
                else:
                    strings[i] = mask_utils.frPyObjects(segmentation, height, width)["counts"]
            elif not segmentation:
                strings[i] = _empty_counts(height, width)
            else:
                polygons += segmentation
                owners += [i] * len(segmentation)
        if polygons:
            _rasterise(polygons, owners, height, width, strings)
        k = end
    try:
        runs = decode_strings(strings)
    except RleError as error:
        raise SegpipeError(f"image {image[error.index]}: malformed RLE ({error})") from None
    short = np.flatnonzero(runs.totals != pixels)
    if len(short):  # pycocotools would walk such runs past their end
        k = int(short[0])
        raise SegpipeError(f"image {image[k]}: a mask's RLE covers {runs.totals[k]} pixels, the image has {pixels[k]}")
    return replace(runs, heights=heights)


def _rasterise(polygons: list, owners: list, height: int, width: int, strings: list) -> None:
    rles = mask_utils.frPyObjects(polygons, height, width)
    start = 0
    while start < len(owners):
        end = start
        while end < len(owners) and owners[end] == owners[start]:
            end += 1
        rle = rles[start] if end - start == 1 else mask_utils.merge(rles[start:end])
        strings[owners[start]] = rle["counts"]
        start = end


@functools.cache
def _empty_counts(height: int, width: int) -> bytes:
    return mask_utils.encode(np.zeros((height, width), np.uint8, order="F"))["counts"]


def coco_boxes(masks: Runs) -> np.ndarray:
    """(n, 4) boxes of masks as pycocotools' toBbox gives them (a run that wraps to the next column makes
    the box span every row), for results that come without a `bbox`."""
    return _coco_boxes(masks.lengths, masks.offsets, masks.heights)


@numba.njit("f8[:, :](i8[:], i8[:], i8[:])", cache=True, nogil=True)
def _coco_boxes(lengths, offsets, heights):
    out = np.zeros((len(offsets) - 1, 4))
    for i in range(len(offsets) - 1):
        h, m = heights[i], (offsets[i + 1] - offsets[i]) // 2 * 2
        if m == 0:
            continue
        xs, ys, xe, ye, cc, xp = np.int64(1) << 62, h, np.int64(0), np.int64(0), np.int64(0), np.int64(0)
        for j in range(m):  # rleToBbox, step for step (uint arithmetic: a -1 wraps around)
            cc += lengths[offsets[i] + j]
            t = cc - j % 2
            if t < 0:
                t += np.int64(1) << 32
            y = t % h
            x = (t - y) // h
            if j % 2 == 0:
                xp = x
            elif xp < x:
                ys, ye = 0, h - 1
            xs, xe, ys, ye = min(xs, x), max(xe, x), min(ys, y), max(ye, y)
        out[i, 0], out[i, 1], out[i, 2], out[i, 3] = xs, ys, xe - xs + 1, ye - ys + 1
    return out


# --- datasets: ground truth as a COCO instances JSON or a dataset table; detections as a COCO results
# --- JSON or the predictions table ----------------------------------------------------------------------


@dataclass(frozen=True)
class _Shard:
    image_ids: tuple[int, ...]  # sorted, as COCOeval orders images
    sizes: dict  # image id -> (height, width)
    truths: tuple[dict, ...] | None  # the shard's annotations (JSON ground truth); None: read from the table
    results: tuple[dict, ...] | None  # the shard's results (JSON); None: read from the predictions table
    gt_table: str | None
    pred_files: tuple[str, ...]
    box_branch: bool
    category_index: dict[int, int]
    iou_type: str


@without_cyclic_gc
def evaluate_ap(gt: str, pred: str, iou_type: str = "segm", workers: int = 1, address: str | None = None,
                shard_size: int = 500, drop_unknown_categories: bool = False, threads: int | None = None,
                progress: Progress = quiet) -> dict:
    """COCO AP of detections against ground truth, with pycocotools' numbers.

    Ground truth: a COCO instances JSON or an instances dataset table (`segpipe convert`); detections: a
    COCO results JSON or the predictions table (file or folder). Per-image statistics are computed in
    shards of `shard_size` images (sorted image ids) and added in image order, so the output does not
    depend on `workers` or `address`. Detections of categories the ground truth lacks are refused, or
    with `drop_unknown_categories` left out as COCOeval leaves them out (`dropped_detections` counts them).
    """
    if iou_type not in ("segm", "bbox"):
        raise SegpipeError(f"--iou-type {iou_type!r}: use segm or bbox")
    categories, sizes, truths, gt_table = _ground_truth(gt, iou_type)
    category_ids = sorted({c["id"] for c in categories})
    category_index = {c: i for i, c in enumerate(category_ids)}
    results, pred_files, box_branch, dropped = _detections(pred, sizes, category_index, iou_type,
                                                           drop_unknown_categories)
    order = sorted(sizes)
    by_image_truths = _by_image(truths) if truths is not None else None
    by_image_results = _by_image(results) if results is not None else None
    shards = []
    for start in range(0, len(order), shard_size):
        ids = tuple(order[start:start + shard_size])
        shards.append(_Shard(ids, {i: sizes[i] for i in ids},
                             None if truths is None else tuple(a for i in ids for a in by_image_truths.get(i, ())),
                             None if results is None else tuple(r for i in ids for r in by_image_results.get(i, ())),
                             gt_table, tuple(pred_files), box_branch, category_index, iou_type))
    total = Statistics.zeros(len(category_ids))
    for stats in map_shards(_evaluate_shard, shards, workers, address, threads,
                            progress=per_shard(progress, len(shards))):
        total += stats
    precision, recall = accumulate(total, len(category_ids))
    summary = summarize(precision, recall)
    per_class = {}
    for k, category_id in enumerate(category_ids):
        values = summarize(precision[:, :, k:k + 1], recall[:, k:k + 1])
        per_class[str(category_id)] = dict(zip(STAT_NAMES, values))
    return {"iou_type": iou_type, "stats": summary, **dict(zip(STAT_NAMES, summary)), "per_class": per_class,
            "dropped_detections": dropped}


def _by_image(items: list[dict]) -> dict:
    grouped: dict = {}
    for item in items:
        grouped.setdefault(item["image_id"], []).append(item)
    return grouped


def _ground_truth(gt: str, iou_type: str) -> tuple[list[dict], dict, list[dict] | None, str | None]:
    """Categories, image sizes, and the annotations of a JSON (None for a table, read per shard)."""
    if is_dataset_table(gt):
        table = open_dataset_table(gt)
        if table.kind != "instances":
            raise SegpipeError(f"{gt}: a table of COCO {table.kind}, not instances (use `segpipe eval pq`)")
        images = table.images(columns=["image_id", "height", "width"])
        sizes = dict(zip(images["image_id"].to_pylist(), zip(images["height"].to_pylist(), images["width"].to_pylist())))
        # Annotation ids are global in COCO: checked over the whole table (one integer column; masks stay per shard).
        ids = table.segments(columns=["segment_id"])["segment_id"].to_numpy()
        if len(np.unique(ids)) < len(ids):
            repeated = sorted(i for i, n in Counter(ids.tolist()).items() if n > 1)
            raise SegpipeError(f"{gt}: duplicate annotation ids {', '.join(map(str, repeated[:5]))}"
                               + (f" (and {len(repeated) - 5} more)" if len(repeated) > 5 else ""))
        return table.categories, sizes, None, gt
    data = read_json(gt)
    if not isinstance(data, dict) or not all(isinstance(data.get(k), list) for k in ("annotations", "categories", "images")):
        raise SegpipeError(f"{gt}: not a COCO instances file (needs 'images', 'annotations', 'categories')")
    _check_truths(data["annotations"], iou_type, gt)
    if iou_type == "segm":
        _check_sizes(data["images"], gt)
    check_integer_ids([im.get("id") for im in data["images"]], gt)
    sizes = {im["id"]: (im.get("height"), im.get("width")) for im in data["images"]}
    if iou_type == "segm":
        _check_rle_sizes(data["annotations"], sizes, gt, "annotation")
    categories = {c["id"] for c in data["categories"]}
    return data["categories"], sizes, [a for a in data["annotations"] if a.get("category_id") in categories], None


def _detections(pred: str, sizes: dict, category_index: dict, iou_type: str, drop: bool
                ) -> tuple[list[dict] | None, list[str], bool, int]:
    """The results of a JSON (None for the predictions table, read per shard), the table's files, whether
    loadRes takes the box branch, and how many detections of unknown categories were dropped."""
    files = parquet_files(pred)
    if files:
        seen, dropped = set(), 0
        for uri in files:
            columns = read_columns(uri, ["image_id", "category_id", "score"])
            seen.update(columns["image_id"].to_pylist())
            _check_scores(columns["score"].to_numpy(), columns["image_id"].to_pylist(), uri)
            dropped += _unknown_categories(columns["category_id"].to_pylist(), category_index, uri, drop)
        if not seen:
            raise SegpipeError(f"{files[0]}: the predictions table is empty")
        refuse_strays(seen, sizes, "predictions table", "detection")
        return None, files, True, dropped  # the table's rows carry boxes, as its COCO results export does
    results = read_json(pred)
    if not isinstance(results, list):
        raise SegpipeError(f"{pred}: not a COCO results file (expected a list of detections)")
    if not results:
        raise SegpipeError(f"{pred}: holds no detections")
    for position, r in enumerate(results):
        if not isinstance(r, dict) or not {"image_id", "category_id", "score"} <= r.keys():
            raise SegpipeError(f"{pred}: result {position} lacks image_id, category_id or score")
    refuse_strays({r["image_id"] for r in results}, sizes, pred, "detection")
    dropped = _unknown_categories([r["category_id"] for r in results], category_index, pred, drop)
    box_branch = loads_as_boxes(results)
    if not box_branch and "segmentation" not in results[0]:
        raise SegpipeError(f"{pred}: results need 'bbox' or 'segmentation'")
    if iou_type == "segm" or not box_branch:  # the masks are read (in the mask branch, for the areas)
        for position, r in enumerate(results):
            problem = _segmentation_problem(r["segmentation"]) if "segmentation" in r else None
            if problem:
                raise SegpipeError(f"{pred}: result {position} (image {r['image_id']}): {problem}")
        _check_rle_sizes(results, sizes, pred, "result")
    return results, [], box_branch, dropped


def _unknown_categories(category_ids: list, category_index: dict, where: str, drop: bool) -> int:
    """How many detections have a category the ground truth lacks; refused unless `drop`.

    COCOeval ignores them, but they are usually a category-list mismatch, so dropping is asked for.
    """
    unknown = [c for c in category_ids if c not in category_index]
    if unknown and not drop:
        first = sorted(set(unknown), key=str)[0]
        raise SegpipeError(f"{where}: unknown category_id {first} (not in the ground truth's categories; "
                           "--drop-unknown-categories leaves such detections out, as pycocotools does)")
    return len(unknown)


def _check_truths(annotations: list, iou_type: str, where: str) -> None:
    """Refuse ground truth that pycocotools cannot read or reads into degenerate numbers."""
    counts = Counter(a.get("id") for a in annotations)
    duplicates = sorted((i for i, n in counts.items() if n > 1), key=str)
    if duplicates:  # COCO() indexes annotations by id: pycocotools would score a mix of the duplicates
        raise SegpipeError(f"{where}: duplicate annotation ids {', '.join(map(str, duplicates[:5]))}"
                           + (f" (and {len(duplicates) - 5} more)" if len(duplicates) > 5 else ""))
    needed = ("area", "bbox", "segmentation") if iou_type == "segm" else ("area", "bbox")
    for a in annotations:
        missing = next((key for key in needed if key not in a), None)
        if missing == "segmentation":
            problem = "no 'segmentation' (detection-only ground truth: use --iou-type bbox)"
        elif missing is not None:  # an area from the mask, the polygon or the box would each give other numbers
            problem = f"no '{missing}'"
        elif a.get("iscrowd", 0) not in (0, 1):  # pycocotools ignores a truthy one but unions it as int(iscrowd)
            problem = f"'iscrowd' is {a['iscrowd']!r}, expected 0 or 1"
        else:
            problem = _segmentation_problem(a["segmentation"]) if iou_type == "segm" else None
        if problem:
            raise SegpipeError(f"{where}: image {a.get('image_id')}: annotation {a.get('id')}: {problem}")
    if iou_type == "segm" and annotations and all(a["segmentation"] == [] for a in annotations):
        # a box dataset converted to COCO: each [] reads as an empty mask, so mask AP would be 0 throughout
        raise SegpipeError(f"{where}: no annotation has a mask (every 'segmentation' is []): use --iou-type bbox")


def _check_rle_sizes(items: list, sizes: dict, where: str, what: str) -> None:
    """An RLE mask must have its image's size: pycocotools scores a pair of other sizes IoU -1 (never a
    match) only where their boxes meet, which no reading of the file intends, so it is refused."""
    for item in items:
        segmentation = item.get("segmentation")
        if isinstance(segmentation, dict) and item.get("image_id") in sizes:
            size = list(segmentation.get("size", []))
            if size != list(sizes[item["image_id"]]):
                raise SegpipeError(f"{where}: image {item['image_id']}: {what} {item.get('id', '')}".rstrip()
                                   + f": RLE size {size} differs from the image's {list(sizes[item['image_id']])}")


def _segmentation_problem(segmentation: object) -> str | None:
    """What is wrong with a segmentation, if anything: polygons need 3 points, an RLE size and counts.

    pycocotools reads a first polygon of 2 points as a box and fails on 1 point, so both are refused;
    an odd trailing coordinate it drops (frPyObjects), and so does segpipe; [] is an empty mask.
    """
    if isinstance(segmentation, dict) and {"size", "counts"} <= segmentation.keys():
        return None
    if not (isinstance(segmentation, list) and all(isinstance(p, list) for p in segmentation)):
        return "'segmentation' is neither polygons nor an RLE"
    short = next((p for p in segmentation if len(p) < 6), None)
    return None if short is None else f"a polygon has {len(short)} coordinates, fewer than 3 points"


def _check_sizes(images: list, where: str) -> None:
    """Masks need positive image sizes (pycocotools overflows on a negative one)."""
    for image in images:
        for key in ("height", "width"):
            value = image.get(key)
            if not (isinstance(value, int) and value > 0):
                raise SegpipeError(f"{where}: image {image.get('id')}: '{key}' is {value!r}, expected a positive integer")


def _check_scores(scores: np.ndarray, image_ids: list, where: str) -> None:
    """A NaN score has no place in COCOeval's ranking (JSON cannot hold one; a table can)."""
    nan = np.flatnonzero(np.isnan(scores))
    if nan.size:
        raise SegpipeError(f"{where}: image {image_ids[nan[0]]}: a detection's score is NaN")


@without_cyclic_gc
def _evaluate_shard(shard: _Shard) -> Statistics:
    if shard.truths is not None:
        truths = truth_instances(shard.truths, shard.sizes, shard.category_index, shard.iou_type)
    else:
        rows = open_dataset_table(shard.gt_table).segments(
            shard.image_ids, ["image_id", "segment_id", "category_id", "iscrowd", "area", "bbox", "rle", "height"])
        truths = _table_instances(rows, shard, truth=True)
    if shard.results is not None:
        dets = detection_instances(shard.results, shard.sizes, shard.category_index, shard.iou_type, shard.box_branch)
    else:
        # A shard is a run of the sorted ground-truth ids and images outside the ground truth were refused, so
        # the id range holds exactly the shard's rows.
        rows = read_rows(shard.pred_files, shard.image_ids[0], shard.image_ids[-1],
                         ["image_id", "category_id", "score", "bbox", "rle", "height"])
        dets = _table_instances(rows, shard, truth=False)
    return batch_statistics(truths, dets, shard.iou_type, len(shard.category_index))


def _table_instances(rows: pa.Table, shard: _Shard, truth: bool) -> Instances:
    """Instances from table rows: masks straight from the RLE strings. Detections take the box branch of
    loadRes (area = box w * h), as the table's COCO results export would."""
    category = index_of(list(shard.category_index), rows["category_id"].to_numpy())  # it enumerates the ids
    if (category < 0).any():  # unknown categories were refused, or are to be dropped
        rows, category = rows.filter(pa.array(category >= 0)), category[category >= 0]
    image = rows["image_id"].to_numpy()
    if (np.diff(image) < 0).any():  # written in image-id order as a rule; restore it (stable) where not
        order = np.argsort(image, kind="stable")
        rows, category = rows.take(order), category[order]
    n = rows.num_rows
    boxes = rows["bbox"].combine_chunks().flatten().to_numpy(zero_copy_only=False).reshape(n, 4).astype(np.float64)
    masks = None
    if shard.iou_type == "segm":
        if truth and rows["rle"].null_count:  # a dataset table keeps detection-only annotations without a mask
            k = int(np.flatnonzero(rows["rle"].is_null().to_numpy(zero_copy_only=False))[0])
            raise SegpipeError(f"{shard.gt_table}: image {rows['image_id'][k]}: annotation {rows['segment_id'][k]}: "
                               "no 'segmentation' (detection-only ground truth: use --iou-type bbox)")
        masks = replace(decode_arrow(rows["rle"]), heights=rows["height"].to_numpy().astype(np.int64))
        sizes = np.array([shard.sizes[i] for i in shard.image_ids], np.int64).reshape(-1, 2)  # ids sorted
        sizes = sizes[np.searchsorted(np.asarray(shard.image_ids), rows["image_id"].to_numpy())]
        bad = np.flatnonzero((masks.heights != sizes[:, 0]) | (masks.totals != sizes[:, 0] * sizes[:, 1]))
        if len(bad):
            k = int(bad[0])
            where = shard.gt_table if truth else shard.pred_files[0]
            raise SegpipeError(f"{where}: image {rows['image_id'][k]}: a mask of {masks.totals[k]} pixels with height "
                               f"{masks.heights[k]}, the image is {sizes[k][0]}x{sizes[k][1]}")
    if truth:
        ids = rows["segment_id"].to_numpy()
        return Instances(rows["image_id"].to_numpy(), category, rows["area"].to_numpy().astype(np.float64), boxes,
                         rows["iscrowd"].to_numpy(zero_copy_only=False).astype(bool), np.ones(n), ids != 0, masks)
    return Instances(rows["image_id"].to_numpy(), category, boxes[:, 2] * boxes[:, 3], boxes, np.zeros(n, bool),
                     rows["score"].to_numpy().astype(np.float64), np.ones(n, bool), masks)


def format_table(result: dict) -> str:
    """The 12 numbers, one per line, as COCOeval.summarize labels them."""
    labels = ("Average Precision  (AP) @[ IoU=0.50:0.95 | area=   all | maxDets=100 ]",
              "Average Precision  (AP) @[ IoU=0.50      | area=   all | maxDets=100 ]",
              "Average Precision  (AP) @[ IoU=0.75      | area=   all | maxDets=100 ]",
              "Average Precision  (AP) @[ IoU=0.50:0.95 | area= small | maxDets=100 ]",
              "Average Precision  (AP) @[ IoU=0.50:0.95 | area=medium | maxDets=100 ]",
              "Average Precision  (AP) @[ IoU=0.50:0.95 | area= large | maxDets=100 ]",
              "Average Recall     (AR) @[ IoU=0.50:0.95 | area=   all | maxDets=  1 ]",
              "Average Recall     (AR) @[ IoU=0.50:0.95 | area=   all | maxDets= 10 ]",
              "Average Recall     (AR) @[ IoU=0.50:0.95 | area=   all | maxDets=100 ]",
              "Average Recall     (AR) @[ IoU=0.50:0.95 | area= small | maxDets=100 ]",
              "Average Recall     (AR) @[ IoU=0.50:0.95 | area=medium | maxDets=100 ]",
              "Average Recall     (AR) @[ IoU=0.50:0.95 | area= large | maxDets=100 ]")
    return "\n".join(f" {label} = {value:0.3f}" for label, value in zip(labels, result["stats"]))
