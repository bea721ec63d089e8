"""The report's Comparison: per-class PQ (panoptic) or AP (instances) of one or two prediction sets, their deltas,
and bootstrap confidence intervals over images.

The bootstrap is the Poisson bootstrap (Hanley & MacGibbon 2006; Chamandy et al. 2012, "Estimating uncertainty
for massive data streams"): in resample b each image counts w(b, image) times, w drawn from Poisson(1), which is
the limit of the multinomial counts of drawing n images out of n with replacement. Each weight is a hash of
(seed, image id, b), so it is the same wherever and in whatever shard the image is read: the intervals depend on
the seed only, never on shards or workers, and a resample's statistics are weighted sums that add across shards.

- PQ: an image's per-class TP, FP, FN and IoU sum come from `evaluate.pq.batch_stats` (the evaluator's own
  matching); a shard returns, per resample, the weighted sums (resamples x classes x 4 numbers), so the driver
  never holds per-image data. PQ of a class in a resample is its IoU sum / (TP + FP/2 + FN/2).
- AP: COCO's AP (IoU .50:.95, all areas, 100 detections) is not a sum over images, so a shard returns each kept
  detection's score and match flags (`evaluate.ap.batch_statistics`, the evaluator's matching) and each image's
  positives; the driver recomputes each class's AP per resample with every detection and positive weighted by
  its image's count (COCO's cumulative TP / FP sums become weighted sums). That holds ~50 bytes a detection.
The interval is the 2.5th and 97.5th percentile over resamples; a delta's is that of the per-resample
difference, which keeps the pairing of the two sets on the same images.
"""

from __future__ import annotations

from dataclasses import dataclass

import numba
import numpy as np
import pyarrow as pa

from pipeline.errors import SegpipeError
from pipeline.evaluate import ap, pq
from pipeline.evaluate.match import OverlapError
from pipeline.report.parts import Parts, category_groups, pack_flags, unpack_flags
from pipeline.structures import ImagePrediction

# P(Poisson(1) <= k) for k = 0..11; a uniform draw above the last reads as 12 (P < 1e-9)
_POISSON_CDF = np.cumsum([np.exp(-1.0) / np.prod(np.arange(1, k + 1, dtype=float)) for k in range(12)])


def poisson_weights(image_ids: np.ndarray, resamples: int, seed: int) -> np.ndarray:
    """(resamples, images) counts drawn from Poisson(1), each a function of (seed, image id, resample) only."""
    ids = np.asarray(image_ids, np.uint64)[None, :]
    b = np.arange(resamples, dtype=np.uint64)[:, None]
    with np.errstate(over="ignore"):
        x = ids * np.uint64(0x9E3779B97F4A7C15) + b * np.uint64(0xD1B54A32D192ED03) + np.uint64(seed) * np.uint64(0x8CB92BA72F3D8DD7)
        x = _splitmix64(_splitmix64(x))
    uniform = (x >> np.uint64(11)).astype(np.float64) * 2.0**-53
    return np.searchsorted(_POISSON_CDF, uniform, side="right").astype(np.uint8)


def _splitmix64(x: np.ndarray) -> np.ndarray:
    x = x + np.uint64(0x9E3779B97F4A7C15)
    x = (x ^ (x >> np.uint64(30))) * np.uint64(0xBF58476D1CE4E5B9)
    x = (x ^ (x >> np.uint64(27))) * np.uint64(0x94D049BB133111EB)
    return x ^ (x >> np.uint64(31))


# --- PQ: per-image statistics, summed per resample in the shard -----------------------------------


@dataclass
class PQPart:
    """A shard's PQ statistics of each prediction set: exact totals, and per resample the weighted sums."""

    totals: list[pq.PQStats]
    resampled: np.ndarray  # (sets, resamples, 4, classes): TP, FP, FN, IoU sum

    def __iadd__(self, other: PQPart) -> PQPart:
        for mine, theirs in zip(self.totals, other.totals):
            mine += theirs
        self.resampled += other.resampled
        return self


def image_pq(truth: ImagePrediction, pred: ImagePrediction, category_index: dict[int, int]) -> pq.PQStats:
    """One image's PQ statistics, by the evaluator's matching (`pq.batch_stats`); unknown predicted categories VOID."""
    where = f"image {truth.image_id}"
    gt_side = pq.table_side(_rows(truth), np.zeros(len(truth.segments), np.int64), 1, category_index, True, where,
                            [truth.image_id])
    pred_side = pq.table_side(_rows(pred), np.zeros(len(pred.segments), np.int64), 1, category_index, False, where,
                              [truth.image_id], drop_unknown=True)
    try:
        return pq.batch_stats([truth.image_id], gt_side, pred_side, len(category_index), "predictions")
    except OverlapError:
        raise SegpipeError(f"predictions: image {truth.image_id}: segments overlap, so this is not a panoptic "
                           "segmentation (give instance ground truth to compare AP)") from None


def _rows(image: ImagePrediction) -> pa.Table:
    s = image.segments
    return pa.table({"image_id": pa.array([image.image_id] * len(s), pa.int64()),
                     "segment_id": pa.array([x.id for x in s], pa.int64()),
                     "category_id": pa.array([x.category_id for x in s], pa.int64()),
                     "iscrowd": pa.array([x.iscrowd for x in s], pa.bool_()),
                     "area": pa.array([x.area for x in s], pa.int64()),
                     "rle": pa.array([x.rle.counts for x in s], pa.string()),
                     "height": pa.array([image.height] * len(s), pa.int64()),
                     "width": pa.array([image.width] * len(s), pa.int64())})


def _pq_shard(data, context) -> PQPart:
    category_index = {c["id"]: k for k, c in enumerate(context.categories)}
    n = len(category_index)
    weights = poisson_weights([im.id for im in data.images], context.resamples, context.seed).astype(np.float64)
    totals, resampled = [], []
    for predictions in _sets(data, context):
        total = pq.PQStats.zeros(n)
        per_image = np.zeros((len(data.images), 4, n))
        for i, (truth, pred) in enumerate(zip(data.truth, predictions)):
            stats = image_pq(truth, pred, category_index)
            total += stats
            per_image[i] = stats.tp, stats.fp, stats.fn, [stats.iou_sum(k) for k in range(n)]
        totals.append(total)
        resampled.append(np.einsum("bi,ijk->bjk", weights, per_image))
    return PQPart(totals, np.stack(resampled))


def _pq_merge(parts: list[PQPart], context) -> tuple[np.ndarray, np.ndarray]:
    """Per set and class: the PQ on all images (NaN where the class never occurs), and per resample."""
    n = len(context.categories)
    point, resampled = [], sum(p.resampled for p in parts)
    for s in range(len(context.names)):
        total = pq.PQStats.zeros(n)
        for part in parts:
            total += part.totals[s]
        summary = pq.summarize(total, list(context.categories))["per_class"]
        point.append([summary[str(c["id"])]["pq"] if _occurs(summary[str(c["id"])]) else np.nan
                      for c in context.categories])
    tp, fp, fn, iou = (resampled[:, :, j] for j in range(4))
    denominator = tp + 0.5 * fp + 0.5 * fn
    with np.errstate(divide="ignore", invalid="ignore"):
        boot = np.where(denominator > 0, iou / denominator, np.nan)
    return np.asarray(point), boot


def _occurs(figures: dict) -> bool:
    return figures["tp"] + figures["fp"] + figures["fn"] > 0


# --- AP: per-detection match flags, reweighted per resample on the driver --------------------------


@dataclass
class APPart:
    """A shard's AP statistics that add: per class the ground truth's positives (not crowd), on all images and
    weighted per resample, and the detections' records written to the scratch folder (per set and class)."""

    positives: np.ndarray  # (classes,)
    weighted: np.ndarray  # (resamples, classes)
    rows: np.ndarray  # (sets, classes): detection records written

    def __iadd__(self, other: APPart) -> APPart:
        self.positives = self.positives + other.positives
        self.weighted = self.weighted + other.weighted
        self.rows = self.rows + other.rows
        return self


def _ap_shard(data, context) -> APPart:
    category_index = {c["id"]: k for k, c in enumerate(context.categories)}
    n = len(category_index)
    sizes = {im.id: (im.height, im.width) for im in data.images}
    annotations = [_annotation(t.image_id, s) for t in data.truth for s in t.segments if s.category_id in category_index]
    truths = ap.truth_instances(annotations, sizes, category_index, "segm")
    spilled = Parts(context.parts)
    rows = []
    for k, predictions in enumerate(_sets(data, context)):
        results = [_annotation(p.image_id, s) for p in predictions for s in p.segments if s.category_id in category_index]
        detections = ap.detection_instances(results, sizes, category_index, "segm", box_branch=False)
        stats = ap.batch_statistics(truths, detections, "segm", n)
        records = pa.table({"image": stats.image, "category": stats.category, "score": stats.score,
                            "matched": pack_flags(stats.matched[0]), "ignored": pack_flags(stats.ignored[0])})  # area 'all'
        spilled.write(f"compare-ap-{k}", data.index, records.take(np.argsort(stats.category, kind="stable")))
        rows.append(np.bincount(stats.category, minlength=n))
    ids = np.array([im.id for im in data.images], np.int64)
    positives = np.zeros((len(ids), n), np.int64)
    counted = ~truths.crowd
    np.add.at(positives, (np.searchsorted(ids, truths.image[counted]), truths.category[counted]), 1)
    weights = poisson_weights(ids, context.resamples, context.seed).astype(np.float64)
    return APPart(positives.sum(0), weights @ positives, np.stack(rows))


def _annotation(image_id: int, segment) -> dict:
    return {"id": segment.id, "image_id": image_id, "category_id": segment.category_id, "iscrowd": int(segment.iscrowd),
            "segmentation": segment.rle.to_coco(), "area": segment.area, "bbox": list(segment.bbox),
            "score": segment.score}


AP_ROWS = 1 << 16
"""Detection records `_ap_merge` reads back at once (a run of classes; a larger class alone)."""


def _ap_merge(parts: list[APPart], context) -> tuple[np.ndarray, np.ndarray]:
    """Per set and class: COCO's AP on all images (NaN without ground truth), and per resample; each class from its
    own detections' records, read back a run of classes at a time."""
    total = parts[0]
    for part in parts[1:]:
        total += part
    spilled = Parts(context.parts)
    point = np.full((len(context.names), len(context.categories)), np.nan)
    boot = np.full((len(context.names), context.resamples, len(context.categories)), np.nan)
    for s in range(len(context.names)):
        for first, last in category_groups(total.rows[s], AP_ROWS):
            rows = spilled.read(f"compare-ap-{s}", [("category", ">=", first), ("category", "<=", last)])
            image, category, score, matched, ignored = (rows.column(name).to_numpy() for name in rows.column_names)
            order = np.lexsort((-score, category))  # COCOeval's order: by class, then score, ties in image order
            bounds = np.searchsorted(category[order], np.arange(first, last + 2))
            shape = (len(ap.IOU_THRESHOLDS),)
            args = (bounds, unpack_flags(matched[order], shape), unpack_flags(ignored[order], shape),
                    np.ascontiguousarray(image[order]))
            classes = slice(first, last + 1)
            point[s, classes] = _weighted_ap(*args, total.positives[None, classes].astype(float), 1, context.seed,
                                             True)[0]
            boot[s, :, classes] = _weighted_ap(*args, np.ascontiguousarray(total.weighted[:, classes]),
                                               context.resamples, context.seed, False)
    return point, boot


@numba.njit(cache=True, nogil=True)
def _poisson_weight(image_id, b, seed):
    """poisson_weights' count of one image in resample b (the same splitmix64 hash, compiled)."""
    x = (np.uint64(image_id) * np.uint64(0x9E3779B97F4A7C15) + np.uint64(b) * np.uint64(0xD1B54A32D192ED03)
         + np.uint64(seed) * np.uint64(0x8CB92BA72F3D8DD7))
    for _ in range(2):
        x = x + np.uint64(0x9E3779B97F4A7C15)
        x = (x ^ (x >> np.uint64(30))) * np.uint64(0xBF58476D1CE4E5B9)
        x = (x ^ (x >> np.uint64(27))) * np.uint64(0x94D049BB133111EB)
        x = x ^ (x >> np.uint64(31))
    uniform = np.float64(x >> np.uint64(11)) * 2.0**-53
    return np.searchsorted(_POISSON_CDF, uniform, side="right")


@numba.njit(cache=True, nogil=True)
def _weighted_ap(bounds, matched, ignored, image, positives, resamples, seed, unit):
    """COCO's AP per (resample, class), every detection counting its image's Poisson weight in that resample (1
    each with `unit`): (resamples, classes), NaN where a resample holds no positive of the class. With unit weights
    it is COCOeval's per-class AP."""
    n_classes = len(bounds) - 1
    n_thresholds = matched.shape[0]
    recall_thresholds = np.linspace(0.0, 1.0, 101)
    eps = np.spacing(1.0)
    out = np.full((resamples, n_classes), np.nan)
    for k in range(n_classes):
        lo, hi = bounds[k], bounds[k + 1]
        n_det = hi - lo
        tp = np.empty(n_det)
        pr = np.empty(n_det)
        weight = np.ones(n_det)
        for b in range(resamples):
            npig = positives[b, k]
            if npig == 0:
                continue
            if not unit:
                for i in range(n_det):
                    weight[i] = _poisson_weight(image[lo + i], b, seed)
            total = 0.0
            for t in range(n_thresholds):
                if n_det == 0:
                    continue
                tp_sum, fp_sum = 0.0, 0.0
                for i in range(n_det):
                    d = lo + i
                    if not ignored[t, d]:
                        if matched[t, d]:
                            tp_sum += weight[i]
                        else:
                            fp_sum += weight[i]
                    tp[i] = tp_sum / npig
                    pr[i] = tp_sum / (fp_sum + tp_sum + eps)
                for i in range(n_det - 1, 0, -1):
                    if pr[i] > pr[i - 1]:
                        pr[i - 1] = pr[i]
                inds = np.searchsorted(tp, recall_thresholds)
                for r in range(len(recall_thresholds)):
                    if inds[r] < n_det:
                        total += pr[inds[r]]
            out[b, k] = total / (n_thresholds * len(recall_thresholds))
    return out


# --- the section ------------------------------------------------------------------------------------


def _sets(data, context) -> list[list[ImagePrediction]]:
    return [data.predictions, data.compare][:len(context.names)]


def shard(data, context) -> PQPart | APPart:
    """A shard's statistics of every prediction set: PQ for panoptic ground truth, AP for instances."""
    return _pq_shard(data, context) if context.kind == "panoptic" else _ap_shard(data, context)


def merge(parts: list, context) -> dict:
    """The Comparison section: per class each set's metric with its interval, and the delta (compare - pred)."""
    point, boot = (_pq_merge if context.kind == "panoptic" else _ap_merge)(parts, context)
    metric = "pq" if context.kind == "panoptic" else "ap"
    rows = []
    for k, c in enumerate(context.categories):
        row = {"id": c["id"], "name": c.get("name", str(c["id"])), "isthing": c.get("isthing", 1) == 1}
        for s, name in enumerate(context.names):
            row[name] = _estimate(point[s, k], boot[s, :, k])
        if len(context.names) == 2:
            row["delta"] = _estimate(point[1, k] - point[0, k], boot[1, :, k] - boot[0, :, k])
        rows.append(row)
    overall = {name: _estimate(_nanmean(point[s]), _nanmean_rows(boot[s])) for s, name in enumerate(context.names)}
    if len(context.names) == 2:
        overall["delta"] = _estimate(overall["compare"]["value"] - overall["pred"]["value"]
                                     if overall["pred"]["value"] is not None and overall["compare"]["value"] is not None
                                     else np.nan, _nanmean_rows(boot[1]) - _nanmean_rows(boot[0]))
    return {"metric": metric, "sets": list(context.names), "resamples": context.resamples, "seed": context.seed,
            "interval": "percentile 95% (2.5th, 97.5th) of a Poisson bootstrap over images",
            "overall": overall, "per_class": rows}


def _nanmean(values: np.ndarray) -> float:
    return float(np.mean(values[~np.isnan(values)])) if (~np.isnan(values)).any() else np.nan


def _nanmean_rows(values: np.ndarray) -> np.ndarray:
    """Per resample, the mean over the classes that occur in it (as the metric averages over occurring classes)."""
    return np.array([_nanmean(row) for row in values])


def _estimate(value: float, resampled: np.ndarray) -> dict:
    """A value and its percentile interval; None where undefined (a class that never occurs)."""
    finite = resampled[~np.isnan(resampled)]
    if np.isnan(value) or not len(finite):
        return {"value": None if np.isnan(value) else float(value), "low": None, "high": None}
    low, high = np.percentile(finite, [2.5, 97.5])
    return {"value": float(value), "low": float(low), "high": float(high)}
