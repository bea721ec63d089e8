"""COCO AP with the semantics of pycocotools' COCOeval, from per-image statistics reduced on the driver."""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass

import numpy as np
from pycocotools import mask as mask_utils

from pipeline.errors import SegpipeError
from pipeline.structures import Rle

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
class Instance:
    """A ground-truth object or a detection, reduced to what matching needs."""

    id: int
    area: float
    iscrowd: bool
    box: tuple[float, float, float, float]
    rle: dict | None  # pycocotools RLE (segm only)
    score: float = 1.0


@dataclass(frozen=True)
class ClassStats:
    """What one image contributes for one category: COCOeval's evaluateImg output, compacted.

    `scores` are the image's top-100 detections by score (stable order); `matched` and `ignored`
    are (areas, thresholds, detections) flags; `positives` counts non-ignored ground truth per area.
    """

    category: int  # position in the sorted category ids
    scores: np.ndarray
    matched: np.ndarray
    ignored: np.ndarray
    positives: np.ndarray


def _ious(detections: list[Instance], truths: list[Instance], iou_type: str) -> np.ndarray:
    crowd = [int(g.iscrowd) for g in truths]
    if iou_type == "segm":
        return np.asarray(mask_utils.iou([d.rle for d in detections], [g.rle for g in truths], crowd), np.float64)
    d = np.asarray([x.box for x in detections], np.float64)
    g = np.asarray([x.box for x in truths], np.float64)
    # The arithmetic of pycocotools' bbIou, element by element, so results agree to the bit.
    w = np.minimum(d[:, None, 2] + d[:, None, 0], g[None, :, 2] + g[None, :, 0]) - np.maximum(d[:, None, 0], g[None, :, 0])
    h = np.minimum(d[:, None, 3] + d[:, None, 1], g[None, :, 3] + g[None, :, 1]) - np.maximum(d[:, None, 1], g[None, :, 1])
    inter = w * h
    d_area, g_area = d[:, 2] * d[:, 3], g[:, 2] * g[:, 3]
    union = np.where(np.asarray(crowd, bool)[None, :], d_area[:, None], d_area[:, None] + g_area[None, :] - inter)
    with np.errstate(divide="ignore", invalid="ignore"):
        return np.where((w > 0) & (h > 0), inter / union, 0.0)


def class_stats(category: int, truths: list[Instance], detections: list[Instance], iou_type: str) -> ClassStats | None:
    """COCOeval.evaluateImg for one image and category, all area ranges and IoU thresholds at once."""
    if not truths and not detections:
        return None
    order = np.argsort([-d.score for d in detections], kind="mergesort")
    detections = [detections[i] for i in order[:MAX_DETS[-1]]]
    n_area, n_thr, n_det, n_gt = len(AREA_RANGES), len(IOU_THRESHOLDS), len(detections), len(truths)
    gt_area = np.asarray([g.area for g in truths], np.float64)
    dt_area = np.asarray([d.area for d in detections], np.float64)
    crowd = np.asarray([g.iscrowd for g in truths], bool)
    low = np.asarray([a[0] for a in AREA_RANGES])[:, None]
    high = np.asarray([a[1] for a in AREA_RANGES])[:, None]
    gt_ignored = crowd[None, :] | (gt_area[None, :] < low) | (gt_area[None, :] > high)  # (A, G)
    matched = np.zeros((n_area, n_thr, n_det), bool)
    ignored = np.zeros((n_area, n_thr, n_det), bool)
    if n_gt and n_det:
        ious = _ious(detections, truths, iou_type)
        gt_nonzero_id = np.asarray([g.id != 0 for g in truths], bool)
        # COCOeval sorts ground truth with the ignored last (stable), per area range; the greedy
        # match then prefers the best non-ignored ground truth, and the last one on IoU ties.
        thresholds = np.minimum(IOU_THRESHOLDS, 1 - 1e-10)[None, :, None]  # (1, T, 1)
        taken = np.zeros((n_area, n_thr, n_gt), bool)
        ignored_gt = gt_ignored[:, None, :]  # (A, 1, G)
        reverse = np.arange(n_gt)[::-1]
        # A detection whose best IoU is under the lowest threshold matches nothing at any threshold.
        for k in np.flatnonzero(ious.max(axis=1) >= IOU_THRESHOLDS[0]).tolist():
            iou = ious[k][None, None, :]
            ok = (~taken | crowd[None, None, :]) & (iou >= thresholds)  # (A, T, G)
            regular = ok & ~ignored_gt
            has_regular = regular.any(axis=2, keepdims=True)
            pool = np.where(has_regular, regular, ok & ignored_gt)
            found = pool.any(axis=2)
            if not found.any():
                continue
            # position sorted by (ignored last, original order) -> pick the maximum IoU, last on ties
            ranked = np.where(pool, iou, -1.0)[:, :, reverse]
            best = reverse[np.argmax(ranked, axis=2)]  # (A, T)
            a_idx, t_idx = np.nonzero(found)
            g_idx = best[a_idx, t_idx]
            taken[a_idx, t_idx, g_idx] = True
            matched[a_idx, t_idx, k] = gt_nonzero_id[g_idx]  # COCOeval stores the gt id; id 0 reads as no match
            ignored[a_idx, t_idx, k] = gt_ignored[a_idx, g_idx]
    outside = (dt_area[None, :] < low) | (dt_area[None, :] > high)  # (A, D)
    ignored |= ~matched & outside[:, None, :]
    positives = (~gt_ignored).sum(axis=1)
    return ClassStats(category, np.asarray([d.score for d in detections], np.float64), matched, ignored, positives)


def accumulate(stats: Iterable[ClassStats], n_categories: int) -> tuple[np.ndarray, np.ndarray]:
    """COCOeval.accumulate: precision (T, R, K, A, M) and recall (T, K, A, M), -1 where undefined.

    `stats` must come in image order (sorted image ids); within an image, detections are already in
    COCOeval's order, so a stable sort by score reproduces its handling of ties exactly.
    """
    n_thr, n_rec, n_area, n_max = len(IOU_THRESHOLDS), len(RECALL_THRESHOLDS), len(AREA_RANGES), len(MAX_DETS)
    precision = -np.ones((n_thr, n_rec, n_categories, n_area, n_max))
    recall = -np.ones((n_thr, n_categories, n_area, n_max))
    by_category: list[list[ClassStats]] = [[] for _ in range(n_categories)]
    for s in stats:
        by_category[s.category].append(s)
    for k, entries in enumerate(by_category):
        if not entries:
            continue
        scores = np.concatenate([e.scores for e in entries])
        rank = np.concatenate([np.arange(len(e.scores)) for e in entries])
        matched = np.concatenate([e.matched for e in entries], axis=2)
        ignored = np.concatenate([e.ignored for e in entries], axis=2)
        positives = np.sum([e.positives for e in entries], axis=0)
        for m, max_det in enumerate(MAX_DETS):
            keep = rank < max_det
            order = np.argsort(-scores[keep], kind="mergesort")
            sorted_scores = scores[keep][order]
            for a in range(n_area):
                if positives[a] == 0:
                    continue
                dtm, dtig = matched[a][:, keep][:, order], ignored[a][:, keep][:, order]
                tp_sum = np.cumsum(dtm & ~dtig, axis=1).astype(float)
                fp_sum = np.cumsum(~dtm & ~dtig, axis=1).astype(float)
                n_det = tp_sum.shape[1]
                rc = tp_sum / positives[a]
                pr = tp_sum / (fp_sum + tp_sum + np.spacing(1))
                recall[:, k, a, m] = rc[:, -1] if n_det else 0
                if not n_det:
                    precision[:, :, k, a, m] = 0
                    continue
                pr = np.maximum.accumulate(pr[:, ::-1], axis=1)[:, ::-1]  # precision envelope
                for t in range(n_thr):
                    inds = np.searchsorted(rc[t], RECALL_THRESHOLDS, side="left")
                    q = np.zeros(n_rec)
                    valid = inds < n_det
                    q[valid] = pr[t, inds[valid]]
                    precision[t, :, k, a, m] = q
    return precision, recall


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


def _rle(segmentation: dict | list, height: int, width: int) -> dict:
    """pycocotools RLE of a COCO segmentation, as COCO.annToRLE makes it (compressed RLE passes as is)."""
    if isinstance(segmentation, dict) and isinstance(segmentation.get("counts"), str):
        return {"size": segmentation["size"], "counts": segmentation["counts"].encode("ascii")}
    return Rle.from_coco(segmentation, height, width)._encoded()


def ground_truth_instances(annotations: Sequence[dict], images: dict, iou_type: str) -> dict[tuple, list[Instance]]:
    """Per (image id, category id) ground-truth instances, in file order (COCO.getAnnIds order)."""
    out: dict[tuple, list[Instance]] = {}
    for a in annotations:
        image = images[a["image_id"]]
        rle = None
        if iou_type == "segm":
            rle = _rle(a["segmentation"], image["height"], image["width"])
        out.setdefault((a["image_id"], a["category_id"]), []).append(
            Instance(a["id"], a["area"], bool(a.get("iscrowd", 0)), tuple(a["bbox"]), rle))
    return out


def loads_as_boxes(results: Sequence[dict]) -> bool:
    """COCO.loadRes's branch, decided by the first result: boxes when it has a non-empty `bbox`."""
    return "bbox" in results[0] and results[0]["bbox"] != []


def detection_instances(results: Sequence[dict], images: dict, iou_type: str, box_branch: bool) -> dict[tuple, list[Instance]]:
    """Per (image id, category id) detections, in file order, as COCO.loadRes prepares them.

    In the box branch (`loads_as_boxes`) every result's area is its box's (w * h), even for segm,
    and a missing segmentation becomes the box polygon; otherwise the area is the mask's.
    """
    out: dict[tuple, list[Instance]] = {}
    for r in results:
        image = images[r["image_id"]]
        h, w = image["height"], image["width"]
        if "bbox" not in r if box_branch else "segmentation" not in r:
            missing = "bbox" if box_branch else "segmentation"
            raise SegpipeError(f"a result for image {r['image_id']} has no '{missing}' (the first result has one)")
        if box_branch:
            x, y, bw, bh = r["bbox"]
            area = bw * bh
            box = (x, y, bw, bh)
            rle = None
            if iou_type == "segm":
                segmentation = r.get("segmentation") or [[x, y, x, y + bh, x + bw, y + bh, x + bw, y]]
                rle = _rle(segmentation, h, w)
        else:
            rle = _rle(r["segmentation"], h, w)
            area = float(mask_utils.area(rle))
            box = tuple(r["bbox"]) if "bbox" in r else tuple(float(v) for v in mask_utils.toBbox(rle))
        out.setdefault((r["image_id"], r["category_id"]), []).append(
            Instance(1, area, False, box, rle, float(r["score"])))  # loadRes numbers results from 1
    return out


# --- datasets ----------------------------------------------------------------------------------


@dataclass(frozen=True)
class _Shard:
    image_ids: tuple[int, ...]  # sorted, as COCOeval orders images
    images: dict
    truths: tuple[dict, ...]
    results: tuple[dict, ...] | None  # None: read this shard's rows from the Parquet files
    parquet: tuple[str, ...]
    box_branch: bool
    category_index: dict[int, int]
    iou_type: str


def evaluate_ap(gt_json: str, pred: str, iou_type: str = "segm", workers: int = 1, address: str | None = None,
                shard_size: int = 100) -> dict:
    """COCO AP of a results JSON or the predictions Parquet against a COCO instances file.

    Per-image statistics are computed in shards of `shard_size` images (in sorted image-id order)
    and reduced on the driver in that order, so the output does not depend on `workers`.
    """
    from pipeline.evaluate.pq import _parquet_files
    from pipeline.evaluate.runner import map_shards
    from pipeline.io.fs import read_json

    if iou_type not in ("segm", "bbox"):
        raise SegpipeError(f"--iou-type {iou_type!r}: use segm or bbox")
    gt = read_json(gt_json)
    if not isinstance(gt, dict) or not all(isinstance(gt.get(k), list) for k in ("annotations", "categories", "images")):
        raise SegpipeError(f"{gt_json}: not a COCO instances file (needs 'images', 'annotations', 'categories')")
    images = {im["id"]: im for im in gt["images"]}
    category_ids = sorted({c["id"] for c in gt["categories"]})
    category_index = {c: i for i, c in enumerate(category_ids)}
    parquet = _parquet_files(pred)
    results_by_image: dict[int, list[dict]] = {}
    if parquet:
        box_branch = True  # the table's rows carry boxes, as its COCO results export does
        from pipeline.io.tables import read_columns

        seen = set()
        for uri in parquet:
            columns = read_columns(uri, ["image_id", "category_id"])
            seen.update(columns["image_id"].to_pylist())
            _check_categories(set(columns["category_id"].to_pylist()), category_index, uri)
        if not seen:
            raise SegpipeError(f"{parquet[0]}: the predictions table is empty")
        _check_images(seen, images, "predictions table")
    else:
        results = read_json(pred)
        if not isinstance(results, list):
            raise SegpipeError(f"{pred}: not a COCO results file (expected a list of detections)")
        if not results:
            raise SegpipeError(f"{pred}: holds no detections")
        for position, r in enumerate(results):
            if not isinstance(r, dict) or not {"image_id", "category_id", "score"} <= r.keys():
                raise SegpipeError(f"{pred}: result {position} lacks image_id, category_id or score")
            results_by_image.setdefault(r["image_id"], []).append(r)
        _check_images(set(results_by_image), images, pred)
        _check_categories({r["category_id"] for r in results}, category_index, pred)
        box_branch = loads_as_boxes(results)
        if not box_branch and "segmentation" not in results[0]:
            raise SegpipeError(f"{pred}: results need 'bbox' or 'segmentation'")
    truths_by_image: dict[int, list[dict]] = {}
    for a in gt["annotations"]:
        if a.get("category_id") in category_index:
            truths_by_image.setdefault(a["image_id"], []).append(a)
    order = sorted(images)
    shards = []
    for start in range(0, len(order), shard_size):
        ids = tuple(order[start:start + shard_size])
        shards.append(_Shard(ids, {i: images[i] for i in ids},
                             tuple(a for i in ids for a in truths_by_image.get(i, [])),
                             None if parquet else tuple(r for i in ids for r in results_by_image.get(i, [])),
                             tuple(parquet), box_branch, category_index, iou_type))
    stats = [s for shard_stats in map_shards(_evaluate_shard, shards, workers, address) for s in shard_stats]
    precision, recall = accumulate(stats, len(category_ids))
    summary = summarize(precision, recall)
    per_class = {}
    for k, category_id in enumerate(category_ids):
        values = summarize(precision[:, :, k:k + 1], recall[:, k:k + 1])
        per_class[str(category_id)] = dict(zip(STAT_NAMES, values))
    return {"iou_type": iou_type, "stats": summary, **dict(zip(STAT_NAMES, summary)), "per_class": per_class}


def _check_images(seen: set, images: dict, where: str) -> None:
    stray = sorted(seen - images.keys(), key=str)
    if stray:
        raise SegpipeError(f"{where}: detection for image {stray[0]}, which is not in the ground truth"
                           + (f" (and {len(stray) - 1} more)" if len(stray) > 1 else ""))


def _check_categories(seen: set, category_index: dict, where: str) -> None:
    unknown = sorted(seen - category_index.keys(), key=str)
    if unknown:
        raise SegpipeError(f"{where}: unknown category_id {unknown[0]} (not in the ground truth's categories)")


def _evaluate_shard(shard: _Shard) -> list[ClassStats]:
    results = shard.results
    if results is None:
        from pipeline.io.tables import read_predictions

        results = [r for p in read_predictions(shard.parquet, image_ids=shard.image_ids) for r in p.to_coco_results()]
        # the table's row order is not COCO's file order: restore the shard's image order, keep row order within
        position = {image_id: i for i, image_id in enumerate(shard.image_ids)}
        results.sort(key=lambda r: position[r["image_id"]])
    truths = ground_truth_instances(shard.truths, shard.images, shard.iou_type)
    detections = detection_instances(results, shard.images, shard.iou_type, shard.box_branch)
    out = []
    for image_id in shard.image_ids:
        for category_id, k in shard.category_index.items():
            s = class_stats(k, truths.get((image_id, category_id), []), detections.get((image_id, category_id), []),
                            shard.iou_type)
            if s is not None:
                out.append(s)
    return out


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
