"""Model errors for the report: per-class metrics, confusion, calibration, TIDE, panoptic error split, label-error candidates.

Each shard of images maps to an `ErrorsPart` of statistics that add (counts, exact PQ sums, a few numbers
per detection, the best candidates and worst images of the shard); `merge_errors` adds the parts in order
and turns them into the report's JSON-ready "errors" section. Intersections come from the one matcher
(`pipeline.evaluate.match`: RLE runs intersected pair by pair); PQ, AP and mIoU are segpipe's own
statistics (`pipeline.evaluate.pq`, `ap`, `miou`), so they equal `segpipe eval`'s.

Definitions (the report's text repeats them):

- *match IoU*: PQ's IoU for panoptic predictions (the prediction's pixels on VOID left out of the union),
  plain mask IoU for instances. A *match* is a pair with match IoU > 0.5, each segment in one pair at most,
  confident predictions first (greedy by score; for panoptic segments such pairs are unique anyway); crowd
  ground truth never matches. *Class-aware* matches (same category) are PQ's true positives; an unmatched
  prediction lying more than half on VOID and same-category crowd is ignored, as PQ ignores it.
- *confusion matrix*: class-agnostic matches of predictions scoring at least `confident`; cell (ground-truth
  category, predicted category); an unmatched ground truth counts in the background column, an unmatched
  (not ignored) prediction in the background row.
- *TIDE*: tidecv 1.0.1's errors and ΔAP, computed as tidecv computes them (its matching at IoU >= 0.5, its
  AP: 101 recall points k / 100, classes with detections but no ground truth count as AP 0, at most 100
  detections per image); ΔAP of a type is tidecv's AP with that type alone fixed minus its AP, floored at 0.
  Crowd ground truth is not a positive; a detection tidecv would ignore for a crowd is left out here (tidecv
  still classifies it), so the numbers equal tidecv's on data without crowd.
- *calibration*: TIDE's detections, a true positive being a TIDE match at IoU 0.5; 10 equal score bins;
  ECE = sum over bins of (bin count / count) * |accuracy - mean score|; MCE the largest gap.
- *panoptic error split*: every PQ false negative and false positive gets one type. A ground truth is *part
  of* a prediction when more than half of its pixels lie in it, and the other way round. *wrong class*: a
  false negative and a false positive that match class-agnostically (one error, counted on both sides);
  *merged*: a false negative part of a prediction that has two or more ground-truth parts, or that prediction
  when it is a false positive; *split*: a false positive part of a ground truth that has two or more predicted
  parts, or that ground truth when it is a false negative; *missed*: any other false negative;
  *hallucinated*: any other false positive. *PQ cost* of a type: the PQ (All) with that type fixed minus the
  PQ: a wrong-class pair becomes a true positive of the ground truth's class at its IoU, the other types' false
  negatives and false positives are taken out of the statistics.
- *image PQ* (worst images): the image's summed match IoU / (TP + FP / 2 + FN / 2), all classes pooled.
- *label-error candidates*, among predictions scoring at least `confident`: *wrong label*, a prediction left
  unmatched that matches class-agnostically an unmatched ground truth of another class (evidence: score x match
  IoU); *missing annotation*, a prediction whose IoU with every ground truth, crowd included, is at most 0.1
  (TIDE's background threshold) and that lies at most half in crowds (evidence: score x (1 - that IoU));
  *bad boundary*, a class-aware match with
  IoU below `boundary_iou` (evidence: score x (1 - IoU)). Each kind ranked by evidence, highest first.
"""

from __future__ import annotations

import posixpath
from dataclasses import dataclass, field, replace

import numpy as np
import pyarrow as pa

from pipeline.errors import SegpipeError
from pipeline.evaluate import ap, pq
from pipeline.evaluate.match import Runs, decode_strings, pair_intersections
from pipeline.report.parts import Parts, category_groups, pack_flags, unpack_flags
from pipeline.review import cvat_coco, frame_names
from pipeline.structures import ImagePrediction, Segment, predictions_to_arrow

TIDE_POS = 0.5
"""tidecv's foreground IoU: a detection is a true positive from this IoU on."""
TIDE_BG = 0.1
"""tidecv's background IoU: a false positive at most this IoU with every ground truth is a background error."""
TIDE_MAX_DETS = 100
"""tidecv keeps the best 100 detections of each image."""
TIDE_TYPES = ("Cls", "Loc", "Both", "Dupe", "Bkg", "Miss")
"""tidecv's main error types, in its order: classification, localisation, both, duplicate, background, missed."""
SPLIT_TYPES = ("wrong_class", "merged", "split", "missed", "hallucinated")
CANDIDATE_KINDS = ("wrong_label", "missing_annotation", "bad_boundary")
_TP = -1  # a detection's kind when it is a true positive


@dataclass(frozen=True)
class ErrorSettings:
    """The knobs of the error analysis.

    confident:    a prediction is confident from this score on: the confusion matrix and the label-error
                  candidates look at confident predictions only (hotcoco's `score_thr` default).
    boundary_iou: a confident class-aware match below this IoU is a bad-boundary candidate.
    top_k:        candidates of each kind, and worst images, the report keeps.
    bins:         calibration bins (equal width over [0, 1]).
    """

    confident: float = 0.5
    boundary_iou: float = 0.75
    top_k: int = 50
    bins: int = 10


@dataclass
class Detections:
    """TIDE's view of each kept detection, in tidecv's order (images in order, scores descending in an image)."""

    category: np.ndarray  # index in the category list
    score: np.ndarray
    kind: np.ndarray  # _TP, or an index in TIDE_TYPES
    fixed: np.ndarray  # Cls / Loc: the category it becomes a true positive of when its type is fixed; -1: dropped

    @classmethod
    def of(cls, rows: list[tuple]) -> Detections:
        columns = list(zip(*rows)) if rows else [(), (), (), ()]
        return cls(np.asarray(columns[0], np.int64), np.asarray(columns[1], np.float64),
                   np.asarray(columns[2], np.int64), np.asarray(columns[3], np.int64))

    def __iadd__(self, other: Detections) -> Detections:
        for name in ("category", "score", "kind", "fixed"):
            setattr(self, name, np.concatenate([getattr(self, name), getattr(other, name)]))
        return self


@dataclass
class ErrorsPart:
    """What one shard of images contributes to the errors section; parts add with `+=`, in image order."""

    categories: int
    detections: Detections
    positives: np.ndarray  # per category: non-crowd ground truth (TIDE's positives)
    missed: np.ndarray  # per category: TIDE's missed errors (unmatched ground truth no Cls / Loc error can fix)
    unmatched: np.ndarray  # per category: all unmatched ground truth (TIDE's FalseNeg)
    confusion: np.ndarray  # (K + 1, K + 1), last row and column background
    ap: ap.Statistics
    pq: pq.PQStats | None  # panoptic only
    split_fn: np.ndarray  # (types, K): false negatives of each split type per ground-truth category
    split_fp: np.ndarray  # (types, K): false positives per predicted category
    wrong_iou: np.ndarray  # (K,) object ints, units of 2^-53: IoU of wrong-class pairs, by ground-truth category
    images: list[dict] = field(default_factory=list)  # the worst images of the part
    candidates: list[dict] = field(default_factory=list)  # the best candidates of each kind
    settings: ErrorSettings = ErrorSettings()
    spilled: np.ndarray | None = None  # (2, K): TIDE's and AP's records per category written to the parts (`spill`)

    def __iadd__(self, other: ErrorsPart) -> ErrorsPart:
        self.detections += other.detections
        for name in ("positives", "missed", "unmatched", "confusion", "split_fn", "split_fp", "wrong_iou", "spilled"):
            setattr(self, name, getattr(self, name) + getattr(other, name))
        self.ap += other.ap
        if self.pq is not None:
            self.pq += other.pq
        self.images = _worst(self.images + other.images, self.settings.top_k)
        self.candidates = _best(self.candidates + other.candidates, self.settings.top_k)
        return self


def _worst(images: list[dict], k: int) -> list[dict]:
    return sorted(images, key=lambda im: (im["pq"], im["image_id"]))[:k]


def _best(candidates: list[dict], k: int) -> list[dict]:
    ranked = sorted(candidates, key=lambda c: (-c["evidence"], c["image_id"], c["pred_segment_id"]))
    kept = []
    for kind in CANDIDATE_KINDS:
        kept += [c for c in ranked if c["kind"] == kind][:k]
    return kept


# --- one shard ------------------------------------------------------------------------------------


def shard_errors(truth: list[ImagePrediction], predictions: list[ImagePrediction], categories: list[dict],
                 panoptic: bool, settings: ErrorSettings = ErrorSettings()) -> ErrorsPart:
    """The errors statistics of one shard: `truth` lists its images, `predictions` their predictions (an image
    without one has no predicted segment)."""
    index = {c["id"]: i for i, c in enumerate(categories)}
    n = len(categories)
    by_image = {p.image_id: p for p in predictions}
    stray = sorted(set(by_image) - {t.image_id for t in truth})
    if stray:
        raise SegpipeError(f"predictions for image {stray[0]}, which is not in the ground truth")
    rows, positives, missed, unmatched = [], np.zeros(n, np.int64), np.zeros(n, np.int64), np.zeros(n, np.int64)
    confusion = np.zeros((n + 1, n + 1), np.int64)
    split_fn, split_fp = np.zeros((len(SPLIT_TYPES), n), np.int64), np.zeros((len(SPLIT_TYPES), n), np.int64)
    wrong_iou = np.zeros(n, object)
    images, candidates = [], []
    for image in truth:
        pred = by_image.get(image.image_id)
        pairs = _Pairs.of(image, pred.segments if pred else (), index, panoptic)
        detections, missed_categories, unmatched_categories = _tide(pairs)
        rows += detections
        np.add.at(positives, pairs.g_cls[~pairs.g_crowd], 1)
        np.add.at(missed, missed_categories, 1)
        np.add.at(unmatched, unmatched_categories, 1)
        matched, ignored = _class_matches(pairs)
        _confuse(pairs, ignored, settings.confident, confusion)
        if panoptic:
            _split(pairs, matched, ignored, split_fn, split_fp, wrong_iou)
        images.append(_image_quality(image.image_id, pairs, matched, ignored))
        candidates += _candidates(image, pairs, matched, settings)
    return ErrorsPart(n, Detections.of(rows), positives, missed, unmatched, confusion,
                      _ap_statistics(truth, predictions, categories),
                      _pq_statistics(truth, predictions, categories) if panoptic else None,
                      split_fn, split_fp, wrong_iou, _worst([im for im in images if im is not None], settings.top_k),
                      _best(candidates, settings.top_k), settings)


@dataclass(frozen=True)
class _Pairs:
    """One image's segments and every (prediction, ground truth) intersection, from the matcher's RLE runs."""

    g_seg: tuple[Segment, ...]
    p_seg: tuple[Segment, ...]
    g_cls: np.ndarray
    g_crowd: np.ndarray
    p_cls: np.ndarray
    p_score: np.ndarray
    p_area: np.ndarray
    g_area: np.ndarray  # pixels of each ground-truth mask
    inter: np.ndarray  # (P, G) pixels
    iou: np.ndarray  # (P, G) mask IoU, as pycocotools' maskUtils.iou (tidecv's)
    match_iou: np.ndarray  # (P, G) PQ's IoU (panoptic) or the mask IoU (instances)
    void: np.ndarray  # (P,) pixels of each prediction on no ground truth (panoptic; zeros for instances)

    @classmethod
    def of(cls, image: ImagePrediction, predicted: tuple[Segment, ...], index: dict, panoptic: bool) -> _Pairs:
        g_seg, p_seg = tuple(image.segments), tuple(predicted)
        g_cls = _categories(g_seg, index, image.image_id, "ground-truth")
        p_cls = _categories(p_seg, index, image.image_id, "predicted")
        g_runs, p_runs = _runs(g_seg, image), _runs(p_seg, image)
        p_idx, g_idx = np.repeat(np.arange(len(p_seg)), len(g_seg)), np.tile(np.arange(len(g_seg)), len(p_seg))
        p_cols, g_cols = ap.column_ranges(p_runs)[p_idx], ap.column_ranges(g_runs)[g_idx]
        meet = (p_cols[:, 0] <= g_cols[:, 1]) & (g_cols[:, 0] <= p_cols[:, 1])
        shared = np.zeros(len(p_idx), np.int64)
        shared[meet] = pair_intersections(p_runs, g_runs, p_idx[meet], g_idx[meet])
        inter = shared.reshape(len(p_seg), len(g_seg))
        p_area, g_area = p_runs.areas, g_runs.areas
        iou = _ratio(inter, p_area[:, None] + g_area[None, :] - inter)
        void = np.zeros(len(p_seg), np.int64)
        match_iou = iou
        if panoptic:  # PQ's union: the prediction's pixels on VOID left out, the ground truth's area as listed
            void = p_area - inter.sum(axis=1)
            listed = np.asarray([s.area for s in g_seg], np.float64)
            match_iou = _ratio(inter, p_area[:, None] + listed[None, :] - inter - void[:, None])
        return cls(g_seg, p_seg, g_cls, np.asarray([s.iscrowd for s in g_seg], bool), p_cls,
                   np.asarray([s.score for s in p_seg], np.float64), p_area, g_area, inter, iou, match_iou, void)

    def by_score(self) -> np.ndarray:
        """Predictions, highest score first, ties in list order (tidecv's and COCO's stable sort)."""
        return np.argsort(-self.p_score, kind="stable")


def _categories(segments: tuple[Segment, ...], index: dict, image_id: int, side: str) -> np.ndarray:
    unknown = next((s for s in segments if s.category_id not in index), None)
    if unknown is not None:
        raise SegpipeError(f"image {image_id}: {side} segment {unknown.id} has unknown category_id {unknown.category_id}")
    return np.asarray([index[s.category_id] for s in segments], np.int64)


def _runs(segments: tuple[Segment, ...], image: ImagePrediction) -> Runs:
    runs = decode_strings([s.rle.counts for s in segments])
    bad = np.flatnonzero(runs.totals != image.height * image.width)
    if len(bad):
        raise SegpipeError(f"image {image.image_id}: segment {segments[bad[0]].id}: the RLE covers {runs.totals[bad[0]]} "
                           f"pixels, the image has {image.height * image.width}")
    return replace(runs, heights=np.full(len(segments), image.height, np.int64))


def _ratio(inter: np.ndarray, union: np.ndarray) -> np.ndarray:
    with np.errstate(divide="ignore", invalid="ignore"):
        return np.where(inter > 0, inter / np.where(inter > 0, union, 1), 0.0)


# --- TIDE, as tidecv 1.0.1 computes it ---------------------------------------------------------------


def _tide(pairs: _Pairs) -> tuple[list[tuple], np.ndarray, np.ndarray]:
    """tidecv's TIDERun._eval_image: each kept detection's (category, score, kind, fixed category), then the
    categories of the missed errors and of all unmatched ground truth."""
    keep = pairs.by_score()[:TIDE_MAX_DETS]
    truths = np.flatnonzero(~pairs.g_crowd)
    iou = pairs.iou[np.ix_(keep, truths)]
    p_cls, g_cls = pairs.p_cls[keep], pairs.g_cls[truths]
    same = p_cls[:, None] == g_cls[None, :]
    cls_iou = iou * same
    used, gt_used = np.zeros(len(keep), bool), np.zeros(len(truths), bool)
    buffer = cls_iou.copy()
    for i in range(len(keep) if len(truths) else 0):
        j = int(np.argmax(buffer[i]))
        if buffer[i, j] >= TIDE_POS:
            used[i], gt_used[j] = True, True
            buffer[:, j] = 0
    ignored = _crowd_ignored(pairs, keep, used)
    rows, fixes = [], {}  # fixes: ground truth -> (best score, detection) among Cls / Loc errors that name it
    usable = np.zeros(len(truths), bool)
    for i in range(len(keep)):
        if ignored[i]:
            continue
        kind, j = _tide_kind(i, used, gt_used, iou, cls_iou, same, len(truths))
        rows.append([int(p_cls[i]), float(pairs.p_score[keep[i]]), kind, -1])
        if kind in (0, 1) and not gt_used[j]:  # tidecv's BestGTMatch: the best-scoring error fixes the GT
            usable[j] = True
            if j not in fixes or fixes[j][0] < rows[-1][1]:
                fixes[j] = (rows[-1][1], len(rows) - 1, int(g_cls[j]) if kind == 0 else int(p_cls[i]))
    for _, row, category in fixes.values():
        rows[row][3] = category
    missed = g_cls[~gt_used & ~usable]
    return [tuple(r) for r in rows], missed, g_cls[~gt_used]


def _crowd_ignored(pairs: _Pairs, keep: np.ndarray, used: np.ndarray) -> np.ndarray:
    """Unmatched detections lying more than half in a crowd of their category (tidecv's ignore regions)."""
    crowds = np.flatnonzero(pairs.g_crowd)
    if not len(crowds):
        return np.zeros(len(keep), bool)
    crowd_iou = pairs.inter[np.ix_(keep, crowds)] / np.maximum(pairs.p_area[keep], 1)[:, None]
    same = pairs.p_cls[keep][:, None] == pairs.g_cls[crowds][None, :]
    return ~used & ((crowd_iou > TIDE_POS) & same).any(axis=1)


def _tide_kind(i: int, used: np.ndarray, gt_used: np.ndarray, iou: np.ndarray, cls_iou: np.ndarray,
               same: np.ndarray, n_truths: int) -> tuple[int, int]:
    """A detection's kind and the ground truth it names, tested in tidecv's order."""
    if used[i]:
        return _TP, -1
    if not n_truths:
        return 4, -1
    j = int(np.argmax(cls_iou[i]))
    if TIDE_BG <= cls_iou[i, j] <= TIDE_POS:
        return 1, j
    other = iou[i] * ~same[i]
    j = int(np.argmax(other))
    if other[j] >= TIDE_POS:
        return 0, j
    if (gt_used * cls_iou[i]).max() >= TIDE_POS:
        return 3, -1
    if iou[i].max() <= TIDE_BG:
        return 4, -1
    return 2, -1


def tide_aps(category: np.ndarray, score: np.ndarray, correct: np.ndarray, order: np.ndarray,
             positives: np.ndarray, present: np.ndarray) -> list[float]:
    """tidecv's AP (percent) of each `present` category: its detections by score (ties by `order`), COCO's
    precision envelope read at recalls k / 100; a category with detections and no positives scores 0."""
    recall_points = np.array([k / 100 for k in range(101)])  # tidecv's grid, not np.linspace's floats
    aps = []
    for c in np.flatnonzero(present):
        members = np.flatnonzero(category == c)
        if not positives[c]:
            aps.append(0.0)
            continue
        members = members[np.lexsort((order[members], -score[members]))]
        tp = np.cumsum(correct[members])
        precision = tp / np.arange(1, len(members) + 1)
        precision = np.maximum.accumulate(precision[::-1])[::-1]
        found = np.searchsorted(tp / positives[c], recall_points, "left")
        y = [float(precision[k]) if k < len(members) else 0.0 for k in found]
        aps.append(sum(y) / len(y) * 100)
    return aps


def _tide_section(part: ErrorsPart, spilled: Parts, groups: list[tuple[int, int]]) -> dict:
    """Counts and ΔAP per type, fixing one type at a time as tidecv's fix_main_errors, and its special errors; tidecv's
    mAP is the mean of per-class APs, and a class's AP needs only the detections of that class (or fixed to it),
    so the detections are read back a run of classes at a time."""
    counts = {name: 0 for name in TIDE_TYPES}
    counts["Miss"] = int(part.missed.sum())
    runs: dict[str, list[float]] = {}
    for first, last in groups:
        rows = spilled.read("tide", [("category", ">=", first), ("category", "<=", last)],
                           [("fixed", ">=", first), ("fixed", "<=", last)])
        d = Detections(*(rows.column(name).to_numpy() for name in ("category", "score", "kind", "fixed")))
        mine = d.kind[(d.category >= first) & (d.category <= last) & (d.kind != _TP)]
        for k, n in enumerate(np.bincount(mine, minlength=len(TIDE_TYPES) - 1)):  # Miss is no detection's kind
            counts[TIDE_TYPES[k]] += int(n)
        for name, aps in _tide_runs(part, d, rows.column("order").to_numpy(), first, last).items():
            runs.setdefault(name, []).extend(aps)
    mean = {name: sum(aps) / len(aps) if aps else 0.0 for name, aps in runs.items()}
    base = mean["base"]
    return {"ap50": base, "counts": counts, "delta_ap": {name: max(mean[name] - base, 0.0) for name in TIDE_TYPES},
            "special_delta_ap": {"FalsePos": mean["FalsePos"] - base, "FalseNeg": mean["FalseNeg"] - base},
            "pos_threshold": TIDE_POS, "background_threshold": TIDE_BG}


def _tide_runs(part: ErrorsPart, d: Detections, position: np.ndarray, first: int, last: int) -> dict[str, list[float]]:
    """The per-class APs of classes first..last: as detected ("base"), with each type fixed, and tidecv's special
    errors; `d` holds every detection of those classes or fixed to one of them, `position` their order."""
    n = part.categories
    tp = d.kind == _TP
    in_range = (np.arange(n) >= first) & (np.arange(n) <= last)
    classes = in_range & ((part.positives > 0) | (np.bincount(d.category, minlength=n) > 0))

    def run(category, score, correct, keep, positives, order):
        present = classes & ((positives > 0) | (np.bincount(category[keep], minlength=n) > 0))
        return tide_aps(category[keep], score[keep], correct[keep], order[keep], positives, present)

    everything = np.ones(len(tp), bool)
    order = (tp.astype(np.int64) << 62) + position  # tidecv's fixed data lists the errors first, then the true positives
    runs = {"base": run(d.category, d.score, tp, everything, part.positives, position)}
    for k, name in enumerate(TIDE_TYPES):
        if name == "Miss":
            runs[name] = run(d.category, d.score, tp, everything, part.positives - part.missed, order)
        else:
            this = d.kind == k
            fixable = this & (d.fixed >= 0)
            runs[name] = run(np.where(fixable, d.fixed, d.category), d.score, tp | fixable, ~this | fixable,
                             part.positives, order)
    runs["FalsePos"] = run(d.category, tp.astype(np.float64), tp, everything, part.positives, order)
    runs["FalseNeg"] = run(d.category, d.score, tp, everything, part.positives - part.unmatched, order)
    return runs


# --- matches, confusion, panoptic error split, candidates ------------------------------------------------


def _greedy(pairs: _Pairs, allowed: np.ndarray, predictions: np.ndarray) -> np.ndarray:
    """Each prediction's matched ground truth (-1 for none): `predictions` in score order each take the free
    allowed ground truth of highest match IoU above 0.5."""
    match = np.full(len(pairs.p_seg), -1, np.int64)
    iou = np.where(allowed & (pairs.match_iou > 0.5) & ~pairs.g_crowd[None, :], pairs.match_iou, 0.0)
    free = np.ones(len(pairs.g_seg), bool)
    for i in predictions:
        row = iou[i] * free
        if len(row) and row.max() > 0:
            match[i] = int(np.argmax(row))
            free[match[i]] = False
    return match


def _class_matches(pairs: _Pairs) -> tuple[np.ndarray, np.ndarray]:
    """PQ's true positives (each prediction's ground truth, or -1) and the unmatched predictions PQ ignores."""
    matched = _greedy(pairs, pairs.p_cls[:, None] == pairs.g_cls[None, :], pairs.by_score())
    same_crowd = pairs.g_crowd[None, :] & (pairs.p_cls[:, None] == pairs.g_cls[None, :])
    ignorable = pairs.void + (pairs.inter * same_crowd).sum(axis=1)
    return matched, (matched < 0) & (2 * ignorable > pairs.p_area)


def _confuse(pairs: _Pairs, ignored: np.ndarray, confident: float, confusion: np.ndarray) -> None:
    """Add the image's class-agnostic matches of confident predictions to the confusion matrix."""
    background = confusion.shape[0] - 1
    order = pairs.by_score()
    order = order[pairs.p_score[order] >= confident]
    match = _greedy(pairs, np.ones_like(pairs.inter, bool), order)
    for i in order:
        if match[i] >= 0:
            confusion[pairs.g_cls[match[i]], pairs.p_cls[i]] += 1
        elif not ignored[i]:
            confusion[background, pairs.p_cls[i]] += 1
    taken = np.zeros(len(pairs.g_seg), bool)
    taken[match[match >= 0]] = True
    for j in np.flatnonzero(~taken & ~pairs.g_crowd):
        confusion[pairs.g_cls[j], background] += 1


def _split(pairs: _Pairs, matched: np.ndarray, ignored: np.ndarray, split_fn: np.ndarray, split_fp: np.ndarray,
           wrong_iou: np.ndarray) -> None:
    """Give each PQ false negative and false positive of the image its type (see the module's definitions)."""
    fn = np.ones(len(pairs.g_seg), bool)
    fn[matched[matched >= 0]] = False
    fn &= ~pairs.g_crowd
    fp = (matched < 0) & ~ignored
    g_types, p_types = np.full(len(pairs.g_seg), -1), np.full(len(pairs.p_seg), -1)
    wrong = _greedy(pairs, fp[:, None] & fn[None, :] & (pairs.p_cls[:, None] != pairs.g_cls[None, :]),
                    pairs.by_score())
    for i in np.flatnonzero(wrong >= 0):
        j = wrong[i]
        g_types[j] = p_types[i] = 0
        wrong_iou[pairs.g_cls[j]] += int(pairs.match_iou[i, j] * 2.0**53)  # exact: IoU in (0.5, 1]
    g_in_p = 2 * pairs.inter > pairs.g_area[None, :]  # (P, G): the ground truth is part of the prediction
    p_in_g = 2 * pairs.inter > pairs.p_area[:, None]  # the prediction is part of the ground truth
    merging = g_in_p.sum(axis=1) >= 2  # predictions with two or more ground-truth parts
    splitting = p_in_g.sum(axis=0) >= 2  # ground truth with two or more predicted parts
    for j in np.flatnonzero(fn & (g_types < 0)):
        g_types[j] = 1 if (g_in_p[:, j] & merging).any() else 2 if splitting[j] else 3
    for i in np.flatnonzero(fp & (p_types < 0)):
        p_types[i] = 2 if (p_in_g[i] & splitting).any() else 1 if merging[i] else 4
    np.add.at(split_fn, (g_types[fn], pairs.g_cls[fn]), 1)
    np.add.at(split_fp, (p_types[fp], pairs.p_cls[fp]), 1)


def _image_quality(image_id: int, pairs: _Pairs, matched: np.ndarray, ignored: np.ndarray) -> dict | None:
    """The image's PQ, all classes pooled, and its counts; None for an image with nothing to score."""
    tp = int((matched >= 0).sum())
    fp = int(((matched < 0) & ~ignored).sum())
    fn = int((~pairs.g_crowd).sum()) - tp
    if not tp + fp + fn:
        return None
    iou = float(sum(pairs.match_iou[i, matched[i]] for i in np.flatnonzero(matched >= 0)))
    return {"image_id": image_id, "pq": iou / (tp + 0.5 * fp + 0.5 * fn), "tp": tp, "fp": fp, "fn": fn}


def _candidates(image: ImagePrediction, pairs: _Pairs, matched: np.ndarray, settings: ErrorSettings) -> list[dict]:
    """The image's label-error candidates (see the module's definitions)."""
    found = []
    confident = pairs.p_score >= settings.confident
    free = np.ones(len(pairs.g_seg), bool)
    free[matched[matched >= 0]] = False
    other_class = pairs.p_cls[:, None] != pairs.g_cls[None, :]
    in_crowd = 2 * (pairs.inter * pairs.g_crowd[None, :]).sum(axis=1) > pairs.p_area
    wrong = _greedy(pairs, ((matched < 0) & confident)[:, None] & free[None, :] & other_class, pairs.by_score())
    for i in np.flatnonzero(confident):
        if wrong[i] >= 0:
            j = wrong[i]
            found.append(_candidate("wrong_label", image, pairs, i, j, pairs.p_score[i] * pairs.match_iou[i, j]))
        elif matched[i] >= 0 and pairs.match_iou[i, matched[i]] < settings.boundary_iou:
            j = matched[i]
            found.append(_candidate("bad_boundary", image, pairs, i, j, pairs.p_score[i] * (1 - pairs.match_iou[i, j])))
        elif matched[i] < 0 and pairs.iou[i].max(initial=0.0) <= TIDE_BG and not in_crowd[i]:
            found.append(_candidate("missing_annotation", image, pairs, i, -1,
                                    pairs.p_score[i] * (1 - pairs.iou[i].max(initial=0.0))))
    return found


def _candidate(kind: str, image: ImagePrediction, pairs: _Pairs, i: int, j: int, evidence: float) -> dict:
    pred, gt = pairs.p_seg[i], pairs.g_seg[j] if j >= 0 else None
    return {"kind": kind, "image_id": image.image_id, "evidence": float(evidence), "score": float(pred.score),
            "iou": float(pairs.match_iou[i, j]) if gt else float(pairs.iou[i].max(initial=0.0)),
            "pred_segment_id": pred.id, "pred_category_id": pred.category_id, "pred_mask": pred.rle.to_coco(),
            "gt_segment_id": gt.id if gt else None, "gt_category_id": gt.category_id if gt else None,
            "gt_mask": gt.rle.to_coco() if gt else None}


# --- segpipe's PQ and AP statistics of the shard -----------------------------------------------------------


def _ap_statistics(truth: list[ImagePrediction], predictions: list[ImagePrediction],
                   categories: list[dict]) -> ap.Statistics:
    """COCOeval's per-detection statistics (segm), as `segpipe eval ap` computes them from a predictions table."""
    ids = sorted(c["id"] for c in categories)
    index = {c: k for k, c in enumerate(ids)}
    return ap.batch_statistics(_instances(truth, index, truth=True), _instances(predictions, index, truth=False),
                               "segm", len(ids))


def _instances(images: list[ImagePrediction], index: dict, truth: bool) -> ap.Instances:
    segments = sorted(((im, s) for im in images for s in im.segments), key=lambda pair: pair[0].image_id)
    n = len(segments)
    boxes = np.asarray([s.bbox for _, s in segments], np.float64).reshape(n, 4)
    runs = decode_strings([s.rle.counts for _, s in segments])
    runs = replace(runs, heights=np.asarray([im.height for im, _ in segments], np.int64))
    image = np.asarray([im.image_id for im, _ in segments], np.int64)
    category = np.asarray([index[s.category_id] for _, s in segments], np.int64)
    if truth:
        return ap.Instances(image, category, np.asarray([s.area for _, s in segments], np.float64), boxes,
                            np.asarray([s.iscrowd for _, s in segments], bool), np.ones(n),
                            np.asarray([s.id != 0 for _, s in segments], bool), runs)
    # The predictions table's rows take loadRes's box branch: a detection's area is its box's.
    return ap.Instances(image, category, boxes[:, 2] * boxes[:, 3], boxes, np.zeros(n, bool),
                        np.asarray([s.score for _, s in segments], np.float64), np.ones(n, bool), runs)


def _pq_statistics(truth: list[ImagePrediction], predictions: list[ImagePrediction],
                   categories: list[dict]) -> pq.PQStats:
    """segpipe's exact PQ statistics of the shard (`segpipe eval pq` on tables of the same segments)."""
    image_ids = [t.image_id for t in truth]
    position = {image_id: k for k, image_id in enumerate(image_ids)}
    index = {c["id"]: i for i, c in enumerate(categories)}
    sides = []
    for images, is_truth in ((truth, True), (predictions, False)):
        rows = predictions_to_arrow(images, "report", "report")
        positions = np.asarray([position[i] for i in rows.column("image_id").to_pylist()], np.int64)
        sides.append(pq.table_side(rows, positions, len(truth), index, is_truth, "report", image_ids))
    return pq.batch_stats(image_ids, sides[0], sides[1], len(categories), "report")


# --- the section --------------------------------------------------------------------------------------------


def spill(part: ErrorsPart, parts: Parts, shard: int) -> ErrorsPart:
    """The part with its per-detection records (TIDE's detections, AP's match flags) written to `parts` as the
    shard's Parquet parts instead, sorted by category: what stays in the part is a few numbers per category."""
    d, stats = part.detections, part.ap
    tide = pa.table({"category": d.category, "score": d.score, "kind": d.kind, "fixed": d.fixed,
                     "order": (shard << 32) + np.arange(len(d.score), dtype=np.int64)})  # tidecv's order: images, then
    parts.write("tide", shard, tide.take(np.argsort(d.category, kind="stable")))  # scores in an image
    flags = {"matched": pack_flags(stats.matched), "ignored": pack_flags(stats.ignored)}
    rows = pa.table({"image": stats.image, "category": stats.category, "score": stats.score, "rank": stats.rank, **flags})
    parts.write("ap", shard, rows.take(np.argsort(stats.category, kind="stable")))  # image order within a category
    spilled = np.stack([np.bincount(d.category, minlength=part.categories),
                        np.bincount(stats.category, minlength=part.categories)])
    return replace(part, detections=Detections.of([]), spilled=spilled,
                   ap=replace(ap.Statistics.zeros(part.categories), positives=stats.positives))


def merge_errors(parts: list[ErrorsPart], categories: list[dict], panoptic: bool, spilled: Parts,
                 budget: int = 1 << 16) -> dict:
    """The report's "errors" section from the shards' parts, added in the order given (image order), and their
    per-detection records in `spilled`, read back `budget` rows (a run of categories) at a time."""
    if not parts:
        raise SegpipeError("no images to analyse")
    total = parts[0]
    for part in parts[1:]:
        total += part
    ids = [c["id"] for c in categories]
    section = {"panoptic": panoptic, "category_ids": ids}
    section.update(_pq_section(total, categories) if panoptic else {"pq": None, "miou": None, "panoptic_errors": None})
    section["ap"] = _ap_section(total.ap.positives, categories, spilled, category_groups(total.spilled[1], budget))
    section["confusion"] = {"labels": [str(i) for i in ids] + ["background"], "iou": 0.5,
                            "min_score": total.settings.confident, "matrix": total.confusion.tolist()}
    section["calibration"] = _calibration(spilled.chunks("tide", ["score", "kind"]), total.settings.bins)
    section["tide"] = _tide_section(total, spilled, category_groups(total.spilled[0], budget))
    section["worst_images"] = total.images
    section["candidates"] = total.candidates
    return section


def _pq_section(total: ErrorsPart, categories: list[dict]) -> dict:
    summary = pq.summarize(total.pq, categories)
    errors = {}
    for k, name in enumerate(SPLIT_TYPES):
        fixed = pq.PQStats(total.pq.tp.copy(), total.pq.fp - total.split_fp[k], total.pq.fn - total.split_fn[k],
                           total.pq.iou.copy(), total.pq.semantic)
        if name == "wrong_class":
            fixed.tp += total.split_fn[k]
            fixed.iou += total.wrong_iou
        errors[name] = {"fn": int(total.split_fn[k].sum()), "fp": int(total.split_fp[k].sum()),
                        "pq_cost": pq.summarize(fixed, categories)["All"]["pq"] - summary["All"]["pq"]}
    return {"pq": {key: summary[key] for key in ("All", "Things", "Stuff", "per_class")}, "miou": summary["semantic"],
            "panoptic_errors": errors}


def _ap_section(positives: np.ndarray, categories: list[dict], spilled: Parts, groups: list[tuple[int, int]]) -> dict:
    """Per-class COCO AP (segpipe eval ap's numbers) and each class's precision at COCO's 101 recall points (IoU
    0.5, all areas, 100 detections); null where a class has no ground truth. COCO accumulates each class on its
    own, so a run of classes at a time gives the same numbers."""
    ids = sorted(c["id"] for c in categories)
    n_thr, n_rec, n_area, n_max = len(ap.IOU_THRESHOLDS), len(ap.RECALL_THRESHOLDS), len(ap.AREA_RANGES), len(ap.MAX_DETS)
    precision, recall = -np.ones((n_thr, n_rec, len(ids), n_area, n_max)), -np.ones((n_thr, len(ids), n_area, n_max))
    for first, last in groups:
        rows = spilled.read("ap", [("category", ">=", first), ("category", "<=", last)])
        image, category, score, rank, matched, ignored = (rows.column(name).to_numpy().copy() for name in rows.column_names)
        shape = (len(ap.AREA_RANGES), len(ap.IOU_THRESHOLDS))
        stats = ap.Statistics(image, category - first, score, rank, unpack_flags(matched, shape),
                              unpack_flags(ignored, shape), positives[first:last + 1])
        precision[:, :, first:last + 1], recall[:, first:last + 1] = ap.accumulate(stats, last - first + 1)
    per_class, curves = {}, {}
    for k, category_id in enumerate(ids):
        per_class[str(category_id)] = dict(zip(ap.STAT_NAMES, ap.summarize(precision[:, :, k:k + 1], recall[:, k:k + 1])))
        curve = precision[0, :, k, 0, 2]
        curves[str(category_id)] = None if curve[0] < 0 else [float(v) for v in curve]
    return {"summary": dict(zip(ap.STAT_NAMES, ap.summarize(precision, recall))), "per_class": per_class,
            "pr_curves": {"iou": 0.5, "recall": [float(v) for v in ap.RECALL_THRESHOLDS], "precision": curves}}


def _calibration(chunks, bins: int) -> dict:
    """Reliability bins and ECE / MCE of the detections' scores against being a TIDE true positive (the
    detections' score and kind, a chunk at a time)."""
    count, scores, hits = np.zeros(bins, np.int64), np.zeros(bins), np.zeros(bins)
    for chunk in chunks:
        score = chunk.column("score").to_numpy()
        which = np.minimum((score * bins).astype(np.int64), bins - 1)
        count += np.bincount(which, minlength=bins)
        scores += np.bincount(which, score, bins)
        hits += np.bincount(which, (chunk.column("kind").to_numpy() == _TP).astype(np.float64), bins)
    rows, ece, mce = [], 0.0, 0.0
    for b in range(bins):
        confidence = scores[b] / count[b] if count[b] else None
        accuracy = hits[b] / count[b] if count[b] else None
        rows.append({"low": b / bins, "high": (b + 1) / bins, "count": int(count[b]),
                     "confidence": confidence, "accuracy": accuracy})
        if count[b]:
            gap = abs(accuracy - confidence)
            ece += count[b] / count.sum() * gap
            mce = max(mce, gap)
    return {"bins": rows, "ece": float(ece), "mce": float(mce), "count": int(count.sum())}


# --- the review hand-off ------------------------------------------------------------------------------------


def candidates_coco(section: dict, images: list[dict], categories: list[dict]) -> dict:
    """The label-error candidates as a COCO instances file in `segpipe review export`'s CVAT form: per candidate
    the annotation the model suggests (wrong label: the labelled mask with the predicted category; missing
    annotation and bad boundary: the predicted mask with the predicted category), with `label_error` saying
    which kind, its evidence and the segments it names. `images`: COCO image entries (id, file_name, height,
    width) of at least the candidates' images."""
    by_id = {im["id"]: im for im in images}
    missing = sorted({c["image_id"] for c in section["candidates"]} - by_id.keys())
    if missing:
        raise SegpipeError(f"image {missing[0]} has candidates and is not among the images given")
    chosen = [by_id[i] for i in dict.fromkeys(c["image_id"] for c in section["candidates"])]
    frames = frame_names([ImagePrediction(im["id"], posixpath.basename(im["file_name"]), im["height"], im["width"])
                          for im in chosen])
    entries = {im["id"]: {"image_id": im["id"], "frame": frames[im["id"]], "height": im["height"],
                          "width": im["width"], "segments": []} for im in chosen}
    notes = []
    for c in section["candidates"]:
        mask = c["gt_mask"] if c["kind"] == "wrong_label" else c["pred_mask"]
        entries[c["image_id"]]["segments"].append({"category_id": c["pred_category_id"], "rle": mask["counts"]})
        notes.append((c["image_id"], {key: c[key] for key in ("kind", "evidence", "score", "iou", "pred_segment_id",
                                                              "gt_segment_id", "gt_category_id")}))
    coco = cvat_coco(list(entries.values()), categories)
    # cvat_coco writes the segments image by image: the notes follow the same order
    ordered = [note for image_id in entries for i, note in notes if i == image_id]
    for annotation, note in zip(coco["annotations"], ordered):
        annotation["label_error"] = note
    return coco
