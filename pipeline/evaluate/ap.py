"""COCO AP with the semantics of pycocotools' COCOeval, from per-image statistics reduced on the driver."""

from __future__ import annotations

from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
from pycocotools import mask as mask_utils

from pipeline.errors import SegpipeError
from pipeline.evaluate.runner import without_cyclic_gc
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
class Objects:
    """One image's ground truth or detections as arrays (file order), reduced to what matching needs."""

    category: np.ndarray  # position in the sorted category ids
    area: np.ndarray
    box: np.ndarray  # (n, 4) COCO [x, y, w, h]
    rles: list | None  # pycocotools RLEs, segm only
    crowd: np.ndarray  # ground truth: iscrowd; detections: all False
    score: np.ndarray  # detections: score; ground truth: ones
    counts_as_match: np.ndarray  # ground truth: id != 0 (COCOeval stores the id, so id 0 reads as no match)

    def __len__(self) -> int:
        return len(self.category)

    def take(self, index: np.ndarray) -> Objects:
        return Objects(self.category[index], self.area[index], self.box[index],
                       None if self.rles is None else [self.rles[i] for i in index.tolist()],
                       self.crowd[index], self.score[index], self.counts_as_match[index])


@dataclass(frozen=True)
class Statistics:
    """What a run of images contributes to AP: COCOeval's evaluateImg output, as flat arrays.

    One entry per kept detection (the top 100 by score of each image and category), in image order
    and, within an image and category, in COCOeval's order: `matched` and `ignored` are (areas,
    thresholds, detections) flags. `positives` counts non-ignored ground truth per (category, area).
    """

    category: np.ndarray
    score: np.ndarray
    rank: np.ndarray  # position within its image and category, by score
    matched: np.ndarray
    ignored: np.ndarray
    positives: np.ndarray

    @classmethod
    def concatenate(cls, parts: Sequence[Statistics], n_categories: int) -> Statistics:
        if not parts:
            empty = np.zeros((len(AREA_RANGES), len(IOU_THRESHOLDS), 0), bool)
            return cls(np.zeros(0, np.int64), np.zeros(0), np.zeros(0, np.int64), empty, empty,
                       np.zeros((n_categories, len(AREA_RANGES)), np.int64))
        return cls(np.concatenate([p.category for p in parts]), np.concatenate([p.score for p in parts]),
                   np.concatenate([p.rank for p in parts]), np.concatenate([p.matched for p in parts], axis=2),
                   np.concatenate([p.ignored for p in parts], axis=2), np.sum([p.positives for p in parts], axis=0))


_LOW = np.asarray([a[0] for a in AREA_RANGES], np.float64)[:, None]
_HIGH = np.asarray([a[1] for a in AREA_RANGES], np.float64)[:, None]
_THRESHOLDS = np.minimum(IOU_THRESHOLDS, 1 - 1e-10)[None, :, None]  # COCOeval's starting IoU per threshold


def _box_ious(d: np.ndarray, g: np.ndarray, crowd: np.ndarray) -> np.ndarray:
    """pycocotools' bbIou, element by element in the same arithmetic, so results agree to the bit."""
    w = np.minimum(d[:, None, 2] + d[:, None, 0], g[None, :, 2] + g[None, :, 0]) - np.maximum(d[:, None, 0], g[None, :, 0])
    h = np.minimum(d[:, None, 3] + d[:, None, 1], g[None, :, 3] + g[None, :, 1]) - np.maximum(d[:, None, 1], g[None, :, 1])
    inter = w * h
    d_area, g_area = d[:, 2] * d[:, 3], g[:, 2] * g[:, 3]
    union = np.where(crowd[None, :], d_area[:, None], d_area[:, None] + g_area[None, :] - inter)
    with np.errstate(divide="ignore", invalid="ignore"):
        return np.where((w > 0) & (h > 0), inter / union, 0.0)


def _ious(dets: Objects, truths: Objects, iou_type: str) -> np.ndarray:
    """IoU of every detection with every ground truth of its own category; -1 across categories."""
    same = dets.category[:, None] == truths.category[None, :]
    if iou_type == "bbox":
        return np.where(same, _box_ious(dets.box, truths.box, truths.crowd), -1.0)
    out = np.full(same.shape, -1.0)
    for k in np.intersect1d(dets.category, truths.category).tolist():
        d_index, g_index = np.flatnonzero(dets.category == k), np.flatnonzero(truths.category == k)
        block = mask_utils.iou([dets.rles[i] for i in d_index], [truths.rles[i] for i in g_index],
                               truths.crowd[g_index].astype(np.uint8).tolist())
        out[np.ix_(d_index, g_index)] = block
    return out


def image_statistics(truths: Objects, dets: Objects, iou_type: str, n_categories: int) -> Statistics:
    """COCOeval.evaluateImg for one image: every category, area range and IoU threshold at once.

    Categories never interact (a detection only meets ground truth of its class), so one greedy
    pass over the image's detections, each category's in COCOeval's score order, gives its matches.
    """
    n_area, n_thr = len(AREA_RANGES), len(IOU_THRESHOLDS)
    # Detections: per category by score (stable: ties keep file order), the top 100.
    order = np.lexsort((-dets.score, dets.category))
    category = dets.category[order]
    starts = np.flatnonzero(np.r_[True, category[1:] != category[:-1]]) if len(order) else np.zeros(0, np.int64)
    rank = np.arange(len(order)) - np.repeat(starts, np.diff(np.r_[starts, len(order)]))
    keep = rank < MAX_DETS[-1]
    dets, rank = dets.take(order[keep]), rank[keep]
    n_det, n_gt = len(dets), len(truths)
    gt_ignored = truths.crowd[None, :] | (truths.area[None, :] < _LOW) | (truths.area[None, :] > _HIGH)  # (A, G)
    matched = np.zeros((n_area, n_thr, n_det), bool)
    ignored = np.zeros((n_area, n_thr, n_det), bool)
    if n_gt and n_det:
        ious = _ious(dets, truths, iou_type)
        taken = np.zeros((n_area, n_thr, n_gt), bool)
        ignored_gt = gt_ignored[:, None, :]
        reverse = np.arange(n_gt)[::-1]
        # A detection whose best IoU is under the lowest threshold matches nothing at any threshold.
        for k in np.flatnonzero(ious.max(axis=1) >= IOU_THRESHOLDS[0]).tolist():
            iou = ious[k][None, None, :]
            ok = (~taken | truths.crowd[None, None, :]) & (iou >= _THRESHOLDS)  # (A, T, G)
            # COCOeval sorts ground truth ignored-last and stops at the ignored once a regular one
            # matched: the best regular ground truth wins, else the best ignored; ties go to the last.
            regular = ok & ~ignored_gt
            pool = np.where(regular.any(axis=2, keepdims=True), regular, ok & ignored_gt)
            found = pool.any(axis=2)
            if not found.any():
                continue
            best = reverse[np.argmax(np.where(pool, iou, -2.0)[:, :, reverse], axis=2)]  # (A, T)
            a_idx, t_idx = np.nonzero(found)
            g_idx = best[a_idx, t_idx]
            taken[a_idx, t_idx, g_idx] = True
            matched[a_idx, t_idx, k] = truths.counts_as_match[g_idx]
            ignored[a_idx, t_idx, k] = gt_ignored[a_idx, g_idx]
    outside = (dets.area[None, :] < _LOW) | (dets.area[None, :] > _HIGH)  # (A, D)
    ignored |= ~matched & outside[:, None, :]
    positives = np.stack([np.bincount(truths.category[~gt_ignored[a]], minlength=n_categories)
                          for a in range(n_area)], axis=1)
    return Statistics(dets.category, dets.score, rank, matched, ignored, positives)


def accumulate(stats: Statistics, n_categories: int) -> tuple[np.ndarray, np.ndarray]:
    """COCOeval.accumulate: precision (T, R, K, A, M) and recall (T, K, A, M), -1 where undefined.

    `stats` must be in image order (sorted image ids); a stable sort by category, then by score,
    keeps COCOeval's order of tied scores exactly.
    """
    n_thr, n_rec, n_area, n_max = len(IOU_THRESHOLDS), len(RECALL_THRESHOLDS), len(AREA_RANGES), len(MAX_DETS)
    precision = -np.ones((n_thr, n_rec, n_categories, n_area, n_max))
    recall = -np.ones((n_thr, n_categories, n_area, n_max))
    by_category = np.argsort(stats.category, kind="stable")
    bounds = np.searchsorted(stats.category[by_category], np.arange(n_categories + 1))
    for k in range(n_categories):
        if not stats.positives[k].any():
            continue
        entries = by_category[bounds[k]:bounds[k + 1]]
        scores, rank = stats.score[entries], stats.rank[entries]
        for m, max_det in enumerate(MAX_DETS):
            kept = entries[rank < max_det]
            order = np.argsort(-stats.score[kept], kind="mergesort")
            kept = kept[order]
            for a in range(n_area):
                positives = stats.positives[k, a]
                if positives == 0:
                    continue
                dtm, dtig = stats.matched[a][:, kept], stats.ignored[a][:, kept]
                tp_sum = np.cumsum(dtm & ~dtig, axis=1).astype(float)
                fp_sum = np.cumsum(~dtm & ~dtig, axis=1).astype(float)
                n_det = tp_sum.shape[1]
                if not n_det:
                    recall[:, k, a, m] = 0
                    precision[:, :, k, a, m] = 0
                    continue
                rc = tp_sum / positives
                pr = tp_sum / (fp_sum + tp_sum + np.spacing(1))
                recall[:, k, a, m] = rc[:, -1]
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
#
# Files from the wild: where pycocotools reads a field one way, so does segpipe. Where pycocotools
# crashes on a field that has one obvious reading, segpipe reads it that way, which gives
# pycocotools' numbers on the file with that field written out: "segmentation": [] is an empty
# mask, a missing iscrowd is 0, uncompressed RLE is its compressed form. Where the numbers would be
# degenerate or the reading a guess (duplicate ids, a missing area, 1- or 2-point polygons, sizes
# that are not positive, masks for segm where no annotation has one), evaluate_ap refuses with one
# line naming the file and the item.


def _rle(segmentation: dict | list, height: int, width: int) -> dict:
    """pycocotools RLE of a COCO segmentation, as COCO.annToRLE makes it (compressed RLE passes as is).

    Uncompressed RLE, which loadRes cannot take without a box (it measures the area with
    maskUtils.area, compressed RLE only), is compressed first; [] is an empty mask (Rle.from_coco).
    """
    if isinstance(segmentation, dict) and isinstance(segmentation.get("counts"), str):
        return {"size": segmentation["size"], "counts": segmentation["counts"].encode("ascii")}
    return Rle.from_coco(segmentation, height, width)._encoded()


def truth_objects(annotations: Sequence[dict], image: dict, category_index: dict, iou_type: str) -> Objects:
    """One image's ground truth as COCO() and COCOeval._prepare see it: area from the file, crowds ignored."""
    n = len(annotations)
    rles = None
    if iou_type == "segm":
        rles = [_rle(a["segmentation"], image["height"], image["width"]) for a in annotations]
    return Objects(np.asarray([category_index[a["category_id"]] for a in annotations], np.int64).reshape(n),
                   np.asarray([a["area"] for a in annotations], np.float64).reshape(n),
                   np.asarray([a["bbox"] for a in annotations], np.float64).reshape(n, 4), rles,
                   np.asarray([bool(a.get("iscrowd", 0)) for a in annotations], bool).reshape(n),
                   np.ones(n), np.asarray([a["id"] != 0 for a in annotations], bool).reshape(n))


def loads_as_boxes(results: Sequence[dict]) -> bool:
    """COCO.loadRes's branch, decided by the first result: boxes when it has a non-empty `bbox`."""
    return "bbox" in results[0] and results[0]["bbox"] != []


def detection_objects(results: Sequence[dict], image: dict, category_index: dict, iou_type: str,
                      box_branch: bool) -> Objects:
    """One image's detections, in file order, as COCO.loadRes prepares them.

    In the box branch (`loads_as_boxes`) every result's area is its box's (w * h), even for segm,
    and a missing segmentation becomes the box polygon; otherwise the area is the mask's.
    """
    h, w = image["height"], image["width"]
    # evaluate_ap refused unknown categories unless asked to drop them; COCOeval never looks at them.
    results = [r for r in results if r["category_id"] in category_index]
    key = "bbox" if box_branch else "segmentation"
    missing = next((r for r in results if key not in r), None)
    if missing is not None:
        raise SegpipeError(f"a result for image {missing['image_id']} has no '{key}' (the first result has one)")
    rles = []
    if box_branch:
        boxes = [r["bbox"] for r in results]
        areas = [b[2] * b[3] for b in boxes]
        if iou_type == "segm":
            for r, (x, y, bw, bh) in zip(results, boxes):  # loadRes adds the box only where the key is missing
                segmentation = r["segmentation"] if "segmentation" in r else [[x, y, x, y + bh, x + bw, y + bh, x + bw, y]]
                rles.append(_rle(segmentation, h, w))
    else:
        rles = [_rle(r["segmentation"], h, w) for r in results]
        areas = [float(a) for a in mask_utils.area(rles)] if rles else []
        boxes = [r["bbox"] if "bbox" in r else mask_utils.toBbox(rle).tolist() for r, rle in zip(results, rles)]
    n = len(results)
    return Objects(np.asarray([category_index[r["category_id"]] for r in results], np.int64).reshape(n),
                   np.asarray(areas, np.float64).reshape(n), np.asarray(boxes, np.float64).reshape(n, 4),
                   rles if iou_type == "segm" else None, np.zeros(n, bool),
                   np.asarray([r["score"] for r in results], np.float64).reshape(n), np.ones(n, bool))


# --- datasets ----------------------------------------------------------------------------------


@dataclass(frozen=True)
class _Shard:
    image_ids: tuple[int, ...]  # sorted, as COCOeval orders images
    images: dict
    truths: tuple[list[dict], ...]  # per image, in file order
    results: tuple[list[dict], ...] | None  # per image, in file order; None: read from the Parquet files
    parquet: tuple[str, ...]
    box_branch: bool
    category_index: dict[int, int]
    iou_type: str


@without_cyclic_gc
def evaluate_ap(gt_json: str, pred: str, iou_type: str = "segm", workers: int = 1, address: str | None = None,
                shard_size: int = 100, drop_unknown_categories: bool = False) -> dict:
    """COCO AP of a results JSON or the predictions Parquet against a COCO instances file.

    Per-image statistics are computed in shards of `shard_size` images (in sorted image-id order)
    and reduced on the driver in that order, so the output does not depend on `workers`.
    Detections of categories the ground truth lacks are refused, or with `drop_unknown_categories`
    left out as COCOeval leaves them out; `dropped_detections` in the result counts them.
    """
    from pipeline.evaluate.runner import map_shards
    from pipeline.io.fs import read_json
    from pipeline.io.tables import parquet_files

    if iou_type not in ("segm", "bbox"):
        raise SegpipeError(f"--iou-type {iou_type!r}: use segm or bbox")
    gt = read_json(gt_json)
    if not isinstance(gt, dict) or not all(isinstance(gt.get(k), list) for k in ("annotations", "categories", "images")):
        raise SegpipeError(f"{gt_json}: not a COCO instances file (needs 'images', 'annotations', 'categories')")
    images = {im["id"]: im for im in gt["images"]}
    category_ids = sorted({c["id"] for c in gt["categories"]})
    category_index = {c: i for i, c in enumerate(category_ids)}
    _check_truths(gt["annotations"], iou_type, gt_json)
    if iou_type == "segm":
        _check_sizes(gt["images"], gt_json)
    parquet = parquet_files(pred)
    results_by_image: dict[int, list[dict]] = {}
    if parquet:
        box_branch = True  # the table's rows carry boxes, as its COCO results export does
        from pipeline.io.tables import read_columns

        seen, dropped = set(), 0
        for uri in parquet:
            columns = read_columns(uri, ["image_id", "category_id", "score"])
            seen.update(columns["image_id"].to_pylist())
            _check_scores(columns["score"].to_numpy(), columns["image_id"].to_pylist(), uri)
            dropped += _unknown_categories(columns["category_id"].to_pylist(), category_index, uri,
                                           drop_unknown_categories)
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
        dropped = _unknown_categories([r["category_id"] for r in results], category_index, pred,
                                      drop_unknown_categories)
        box_branch = loads_as_boxes(results)
        if not box_branch and "segmentation" not in results[0]:
            raise SegpipeError(f"{pred}: results need 'bbox' or 'segmentation'")
        if iou_type == "segm" or not box_branch:  # the masks are read (in the mask branch, for the areas)
            for position, r in enumerate(results):
                problem = _segmentation_problem(r["segmentation"]) if "segmentation" in r else None
                if problem:
                    raise SegpipeError(f"{pred}: result {position} (image {r['image_id']}): {problem}")
    truths_by_image: dict[int, list[dict]] = {}
    for a in gt["annotations"]:
        if a.get("category_id") in category_index:
            truths_by_image.setdefault(a["image_id"], []).append(a)
    order = sorted(images)
    shards = []
    for start in range(0, len(order), shard_size):
        ids = tuple(order[start:start + shard_size])
        shards.append(_Shard(ids, {i: images[i] for i in ids},
                             tuple(truths_by_image.get(i, []) for i in ids),
                             None if parquet else tuple(results_by_image.get(i, []) for i in ids),
                             tuple(parquet), box_branch, category_index, iou_type))
    stats = Statistics.concatenate(map_shards(_evaluate_shard, shards, workers, address), len(category_ids))
    precision, recall = accumulate(stats, len(category_ids))
    summary = summarize(precision, recall)
    per_class = {}
    for k, category_id in enumerate(category_ids):
        values = summarize(precision[:, :, k:k + 1], recall[:, k:k + 1])
        per_class[str(category_id)] = dict(zip(STAT_NAMES, values))
    return {"iou_type": iou_type, "stats": summary, **dict(zip(STAT_NAMES, summary)), "per_class": per_class,
            "dropped_detections": dropped}


def _check_images(seen: set, images: dict, where: str) -> None:
    stray = sorted(seen - images.keys(), key=str)
    if stray:
        raise SegpipeError(f"{where}: detection for image {stray[0]}, which is not in the ground truth"
                           + (f" (and {len(stray) - 1} more)" if len(stray) > 1 else ""))


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
        else:
            problem = _segmentation_problem(a["segmentation"]) if iou_type == "segm" else None
        if problem:
            raise SegpipeError(f"{where}: image {a.get('image_id')}: annotation {a.get('id')}: {problem}")
    if iou_type == "segm" and annotations and all(a["segmentation"] == [] for a in annotations):
        # a box dataset converted to COCO: each [] reads as an empty mask, so mask AP would be 0 throughout
        raise SegpipeError(f"{where}: no annotation has a mask (every 'segmentation' is []): use --iou-type bbox")


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
    results = shard.results
    if results is None:
        from pipeline.io.tables import read_predictions

        by_image = {p.image_id: p.to_coco_results() for p in read_predictions(shard.parquet, image_ids=shard.image_ids)}
        results = tuple(by_image.get(i, []) for i in shard.image_ids)
    n_categories = len(shard.category_index)
    parts = []
    for image_id, truths, dets in zip(shard.image_ids, shard.truths, results):
        if truths or dets:
            image = shard.images[image_id]
            parts.append(image_statistics(truth_objects(truths, image, shard.category_index, shard.iou_type),
                                          detection_objects(dets, image, shard.category_index, shard.iou_type,
                                                            shard.box_branch),
                                          shard.iou_type, n_categories))
    return Statistics.concatenate(parts, n_categories)


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
