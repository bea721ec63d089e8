"""Panoptic quality with the semantics of panopticapi's `pq_compute`, as per-class statistics that add."""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from pipeline.errors import SegpipeError
from pipeline.evaluate.runner import without_cyclic_gc

VOID = 0


# IoU sums are kept exactly, as integers in units of 2^-1100 (every float64 IoU is a whole number
# of those), so that adding per-image statistics in any grouping gives the same bits.
_IOU_SCALE_BITS = 1100


def _exact(value: float) -> int:
    mantissa, exponent = math.frexp(value)
    return int(mantissa * (1 << 53)) << (exponent - 53 + _IOU_SCALE_BITS)


@dataclass
class PQStats:
    """Per-class true positives, false positives, false negatives and summed IoU of the matches.

    Arrays are indexed by the position of the category in the ground truth's category list, so two
    statistics add element-wise; the IoU sum is exact, so any grouping of images gives the same result.
    """

    tp: np.ndarray
    fp: np.ndarray
    fn: np.ndarray
    iou: np.ndarray  # Python ints, units of 2^-1100

    @classmethod
    def zeros(cls, n_categories: int) -> PQStats:
        return cls(*(np.zeros(n_categories, np.int64) for _ in range(3)), np.zeros(n_categories, object))

    def __iadd__(self, other: PQStats) -> PQStats:
        self.tp += other.tp
        self.fp += other.fp
        self.fn += other.fn
        self.iou += other.iou
        return self

    def iou_sum(self, index: int) -> float:
        """The summed IoU of a class, correctly rounded."""
        return int(self.iou[index]) / (1 << _IOU_SCALE_BITS)


class _IdLookup:
    """Maps 24-bit panoptic ids to small indices with one gather through a reused 2^24 table.

    Index 0: an id the JSON does not list; 1: VOID; k + 2: the k-th listed segment. Only the listed
    entries are written and cleared again, so each image costs O(pixels + segments).
    """

    def __init__(self) -> None:
        self.table = np.zeros(256**3, np.int32)

    def index(self, ids: np.ndarray, segment_ids: Sequence[int], scale: int = 1) -> np.ndarray:
        """The index of every pixel's id, times `scale` (so two maps combine with one add)."""
        keys = np.asarray(segment_ids, np.int64)
        self.table[VOID] = scale
        self.table[keys] = np.arange(2, len(keys) + 2, dtype=np.int32) * scale
        try:
            return np.take(self.table, ids)  # np.take gathers about twice as fast as table[ids]
        finally:
            self.table[keys] = 0
            self.table[VOID] = 0


_LOOKUP: _IdLookup | None = None


def _lookup() -> _IdLookup:
    global _LOOKUP
    if _LOOKUP is None:  # one per process: 64 MiB, allocated lazily
        _LOOKUP = _IdLookup()
    return _LOOKUP


def image_stats(image_id: object, gt_ids: np.ndarray, gt_segments: Sequence[dict], pred_ids: np.ndarray,
                pred_segments: Sequence[dict], category_index: dict[int, int], where: str) -> PQStats:
    """PQ statistics of one image, exactly as panopticapi counts them.

    A match is a same-category (gt, pred) pair with IoU > 0.5, where the union leaves out the
    prediction's pixels on VOID; crowd ground truth never matches; an unmatched prediction lying more
    than half on VOID plus same-category crowd is not a false positive. Ground-truth areas come from
    the JSON (as panopticapi takes them); prediction areas from the PNG.
    """
    if gt_ids.shape != pred_ids.shape:
        raise SegpipeError(f"{where}: image {image_id}: prediction is {pred_ids.shape[0]}x{pred_ids.shape[1]} "
                           f"(HxW), ground truth is {gt_ids.shape[0]}x{gt_ids.shape[1]}")
    stats = PQStats.zeros(len(category_index))
    n_gt, n_pred = len(gt_segments), len(pred_segments)
    pred_keys = [s["id"] for s in pred_segments]
    if len(set(pred_keys)) != n_pred:
        raise SegpipeError(f"{where}: image {image_id}: duplicate segment ids in the prediction")
    for s in pred_segments:
        if s["category_id"] not in category_index:
            raise SegpipeError(f"{where}: image {image_id}: segment {s['id']} has unknown category_id {s['category_id']}")
    # Pixels come in runs where neither map changes (long, in panoptic maps): only run starts are
    # looked up, and the run lengths are the intersection counts. Bits above 24 (an RGBA decode's
    # alpha byte) are ignored.
    g, p = gt_ids.ravel(), pred_ids.ravel()
    change = np.empty(g.size, bool)
    change[:1] = True
    np.not_equal(g[1:], g[:-1], out=change[1:])
    change[1:] |= p[1:] != p[:-1]
    starts = np.flatnonzero(change)
    lengths = np.diff(starts, append=g.size)
    lookup = _lookup()
    width = n_pred + 2
    p_index = lookup.index(p[starts] & 0xFFFFFF, pred_keys)
    joint = lookup.index(g[starts] & 0xFFFFFF, [s["id"] for s in gt_segments], scale=width)
    joint += p_index  # (gt index) * width + (pred index)
    counts = np.bincount(joint, weights=lengths, minlength=(n_gt + 2) * width).astype(np.int64)
    counts = counts.reshape(n_gt + 2, width)
    pred_area = counts.sum(axis=0)
    if pred_area[0]:
        stray = int(np.unique(p[starts][p_index == 0] & 0xFFFFFF)[0])
        raise SegpipeError(f"{where}: image {image_id}: segment {stray} is in the PNG and not in the JSON")
    missing = [pred_keys[k] for k in range(n_pred) if pred_area[k + 2] == 0]
    if missing:
        raise SegpipeError(f"{where}: image {image_id}: segment {missing[0]} is in the JSON and not in the PNG")
    pred_area = pred_area[2:]

    gt_category = np.array([category_index.get(s["category_id"], -1) for s in gt_segments], np.int64)
    gt_crowd = np.array([s.get("iscrowd", 0) == 1 for s in gt_segments], bool)
    gt_area = np.array([s["area"] for s in gt_segments], np.int64)
    pred_category = np.array([category_index[s["category_id"]] for s in pred_segments], np.int64)
    intersection = counts[2:, 2:]  # ground-truth ids the JSON does not list (row 0) never match
    void = counts[1, 2:]
    union = pred_area[None, :] + gt_area[:, None] - intersection - void[None, :]
    candidate = (intersection > 0) & (gt_category[:, None] == pred_category[None, :]) & ~gt_crowd[:, None]
    with np.errstate(divide="ignore", invalid="ignore"):
        iou = np.where(candidate, intersection / np.where(candidate, union, 1), 0.0)
    matched = candidate & (iou > 0.5)
    rows, cols = np.nonzero(matched)
    for row, col in zip(rows.tolist(), cols.tolist()):
        stats.tp[gt_category[row]] += 1
        stats.iou[gt_category[row]] += _exact(float(iou[row, col]))
    gt_matched, pred_matched = matched.any(axis=1), matched.any(axis=0)

    crowd_of_category: dict[int, int] = {}
    for k, segment in enumerate(gt_segments):
        if gt_matched[k]:
            continue
        if gt_crowd[k]:
            crowd_of_category[segment["category_id"]] = k  # the last crowd segment of a class wins
        elif gt_category[k] >= 0:
            stats.fn[gt_category[k]] += 1
    for k, segment in enumerate(pred_segments):
        if pred_matched[k]:
            continue
        ignored = int(void[k])
        crowd = crowd_of_category.get(segment["category_id"])
        if crowd is not None:
            ignored += int(intersection[crowd, k])
        if ignored / pred_area[k] > 0.5:
            continue
        stats.fp[pred_category[k]] += 1
    return stats


def summarize(stats: PQStats, categories: Sequence[dict]) -> dict:
    """All / Things / Stuff averages over the classes that occur, and per-class figures.

    A class enters the averages where it has a TP, FP or FN, as in panopticapi; per_class lists every
    class, zeros where it does not occur. A group with no occurring class (Stuff in a things-only
    dataset) reports zeros with n = 0 where panopticapi divides by zero.
    """
    per_class, occurring = {}, {}
    for i, category in enumerate(categories):
        tp, fp, fn, iou = int(stats.tp[i]), int(stats.fp[i]), int(stats.fn[i]), stats.iou_sum(i)
        denominator = tp + 0.5 * fp + 0.5 * fn
        figures = {"pq": iou / denominator if denominator else 0.0, "sq": iou / tp if tp else 0.0,
                   "rq": tp / denominator if denominator else 0.0, "tp": tp, "fp": fp, "fn": fn, "iou": iou}
        per_class[str(category["id"])] = figures
        if tp + fp + fn:
            occurring[category["id"]] = figures
    result = {}
    for name, isthing in {"All": None, "Things": True, "Stuff": False}.items():
        members = [occurring[c["id"]] for c in categories
                   if c["id"] in occurring and (isthing is None or bool(c.get("isthing")) == isthing)]
        n = len(members)
        result[name] = {key: (sum(m[key] for m in members) / n if n else 0.0) for key in ("pq", "sq", "rq")}
        result[name]["n"] = n
    result["per_class"] = per_class
    return result


# --- datasets: GT JSON + PNG folder against predictions as JSON + PNG folder or as Parquet ------


@dataclass(frozen=True)
class _Shard:
    """Images one task evaluates: (gt annotation, prediction annotation or None for Parquet) pairs."""

    pairs: tuple[tuple[dict, dict | None], ...]
    gt_dir: str
    pred_dir: str | None  # None: predictions come from the Parquet table
    parquet: tuple[str, ...]
    category_index: dict[int, int]


@without_cyclic_gc
def evaluate_pq(gt_json: str, pred: str, gt_dir: str | None = None, pred_dir: str | None = None,
                workers: int = 1, address: str | None = None, shard_size: int = 50) -> dict:
    """PQ of predictions (COCO panoptic JSON + PNGs, or the predictions Parquet) against COCO panoptic GT.

    The output depends only on the inputs: shards are fixed runs of `shard_size` images in the
    ground truth's order, and their statistics are added in that order whatever `workers` is.
    """
    from pipeline.evaluate.runner import map_shards
    from pipeline.io.fs import read_json
    from pipeline.io.tables import parquet_files
    from pipeline.validate import default_folder

    gt = read_json(gt_json)
    if not isinstance(gt, dict) or not all(isinstance(gt.get(k), list) for k in ("annotations", "categories", "images")):
        raise SegpipeError(f"{gt_json}: not a COCO panoptic file (needs 'images', 'annotations', 'categories')")
    categories = gt["categories"]
    category_index = {c["id"]: i for i, c in enumerate(categories)}
    gt_images = {a["image_id"] for a in gt["annotations"]}
    parquet = parquet_files(pred)
    if parquet:
        pairs = [(a, None) for a in gt["annotations"]]
        _check_parquet_images(parquet, gt_images)
    else:
        predictions = read_json(pred)
        if not isinstance(predictions, dict) or not isinstance(predictions.get("annotations"), list):
            raise SegpipeError(f"{pred}: not a COCO panoptic predictions file (no 'annotations' list)")
        if not predictions["annotations"]:
            raise SegpipeError(f"{pred}: holds no predictions")
        by_image = {a.get("image_id"): a for a in predictions["annotations"]}
        stray = sorted(set(by_image) - gt_images, key=str)
        if stray:
            raise SegpipeError(f"{pred}: prediction for image {stray[0]}, which is not in the ground truth"
                               + (f" (and {len(stray) - 1} more)" if len(stray) > 1 else ""))
        missing = [a["image_id"] for a in gt["annotations"] if a["image_id"] not in by_image]
        if missing:
            raise SegpipeError(f"{pred}: no prediction for image {missing[0]}"
                               + (f" (and {len(missing) - 1} more)" if len(missing) > 1 else ""))
        pairs = [(a, by_image[a["image_id"]]) for a in gt["annotations"]]
        pred_dir = pred_dir or default_folder(pred)
    gt_dir = gt_dir or default_folder(gt_json)
    shards = [_Shard(tuple(pairs[i:i + shard_size]), gt_dir, None if parquet else pred_dir, tuple(parquet), category_index)
              for i in range(0, len(pairs), shard_size)]
    total = PQStats.zeros(len(categories))
    for stats in map_shards(_evaluate_shard, shards, workers, address):
        total += stats
    return summarize(total, categories)


def _check_parquet_images(files: list[str], gt_images: set) -> None:
    from pipeline.io.tables import read_columns

    seen = set()
    for uri in files:
        seen.update(read_columns(uri, ["image_id"])["image_id"].to_pylist())
    if not seen:
        raise SegpipeError(f"{files[0]}: the predictions table is empty")
    stray = sorted(seen - gt_images)
    if stray:
        raise SegpipeError(f"predictions table: image {stray[0]} is not in the ground truth"
                           + (f" (and {len(stray) - 1} more)" if len(stray) > 1 else ""))


@without_cyclic_gc
def _evaluate_shard(shard: _Shard) -> PQStats:
    from pipeline.io.fs import join
    from pipeline.structures import panoptic_words

    stats = PQStats.zeros(len(shard.category_index))
    table_predictions = _table_predictions(shard) if shard.pred_dir is None else {}
    gt_files = _Folder(shard.gt_dir)
    pred_files = _Folder(shard.pred_dir) if shard.pred_dir is not None else None
    for gt_ann, pred_ann in shard.pairs:
        gt_uri = join(shard.gt_dir, gt_ann["file_name"])
        gt_ids = panoptic_words(gt_files.read(gt_ann["file_name"]), gt_uri)
        if pred_files is not None:
            pred_uri = join(shard.pred_dir, pred_ann["file_name"])
            pred_ids = panoptic_words(pred_files.read(pred_ann["file_name"]), pred_uri)
            pred_segments, where = pred_ann.get("segments_info", []), pred_uri
        else:
            prediction = table_predictions.get(gt_ann["image_id"])
            if prediction is None:  # an image without predicted segments: all VOID
                pred_ids, pred_segments = np.zeros_like(gt_ids), []
            else:
                pred_ids, pred_segments = _panoptic(prediction, shard.parquet)
            where = "predictions table"
        stats += image_stats(gt_ann["image_id"], gt_ids, gt_ann["segments_info"], pred_ids, pred_segments,
                             shard.category_index, where)
    return stats


class _Folder:
    """Files of one folder, its filesystem resolved once rather than per file."""

    def __init__(self, uri: str) -> None:
        from pipeline.io.fs import url_to_fs

        self.uri = uri
        self.fs, self.root = url_to_fs(uri)

    def read(self, name: str) -> bytes:
        try:
            return self.fs.cat_file(f"{self.root.rstrip('/')}/{name}")
        except FileNotFoundError:
            raise SegpipeError(f"{self.uri.rstrip('/')}/{name}: no such file") from None


def _panoptic(prediction, files: Sequence[str]) -> tuple[np.ndarray, list[dict]]:
    """A table row group's id map; overlapping segments are an instance model's output, which PQ cannot score."""
    try:
        return prediction.to_panoptic()
    except ValueError as error:
        table = files[0] if len(files) == 1 else files[0].rsplit("/", 1)[0]
        raise SegpipeError(f"{table}: {error}; the table holds instance predictions (overlapping masks): "
                           "evaluate them with segpipe eval ap") from None


def _table_predictions(shard: _Shard) -> dict:
    """This shard's images from the Parquet files, read with a filter so memory stays per shard."""
    from pipeline.io.tables import read_predictions

    wanted = [gt_ann["image_id"] for gt_ann, _ in shard.pairs]
    return {p.image_id: p for p in read_predictions(shard.parquet, image_ids=wanted)}


def format_table(result: dict) -> str:
    """The summary table panopticapi prints, scores in percent."""
    lines = [f"{'':10}|    PQ     SQ     RQ     N", "-" * 38]
    for name in ("All", "Things", "Stuff"):
        r = result[name]
        lines.append(f"{name:10}| {100 * r['pq']:5.1f}  {100 * r['sq']:5.1f}  {100 * r['rq']:5.1f}  {r['n']:4d}")
    return "\n".join(lines)
