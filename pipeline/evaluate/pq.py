"""Panoptic quality with the semantics of panopticapi's `pq_compute`, as per-class statistics that add."""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import pyarrow as pa

from pipeline.errors import SegpipeError
from pipeline.evaluate import miou
from pipeline.evaluate import check_integer_ids, refuse_strays
from pipeline.evaluate.match import (VOID, Labelling, OverlapError, Overlaps, RleError, RleLabelling, RleSizeError,
                                     arrow_strings, index_of)
from pipeline.evaluate.miou import ConfusionStats, confusion_from_overlaps
from pipeline.evaluate.runner import map_shards, without_cyclic_gc
from pipeline.io.fs import join, read_json, url_to_fs
from pipeline.io.tables import is_dataset_table, open_dataset_table, parquet_files, read_columns, read_rows
from pipeline.progress import Progress, per_shard, quiet
from pipeline.structures import MAX_SEGMENT_ID, panoptic_words
from pipeline.validate import default_folder

# IoU sums are kept exactly, as integers in units of 2^-53: a match has IoU in (0.5, 1], and every
# float64 there is a whole number of those. So per-image statistics add to the same bits in any grouping.
_IOU_SCALE_BITS = 53


def _exact(value: float) -> int:
    """An IoU of a match, (0.5, 1], as a whole number of 2^-53."""
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
    iou: np.ndarray  # Python ints, units of 2^-53
    semantic: ConfusionStats  # the semantic view of the same pixels (mIoU), from the same overlaps

    @classmethod
    def zeros(cls, n_categories: int) -> PQStats:
        return cls(*(np.zeros(n_categories, np.int64) for _ in range(3)), np.zeros(n_categories, object),
                   ConfusionStats.zeros(n_categories))

    def __iadd__(self, other: PQStats) -> PQStats:
        self.tp += other.tp
        self.fp += other.fp
        self.fn += other.fn
        self.iou += other.iou
        self.semantic += other.semantic
        return self

    def iou_sum(self, index: int) -> float:
        """The summed IoU of a class, correctly rounded."""
        return int(self.iou[index]) / (1 << _IOU_SCALE_BITS)


@dataclass(frozen=True)
class PanopticSide:
    """Ground truth or prediction of a batch of images: the segments, flat in image order, and their pixels."""

    image: np.ndarray  # position of the segment's image in the batch, non-decreasing
    id: np.ndarray  # segment id, for messages
    category: np.ndarray  # index in the ground truth's category list; -1 for a category it lacks
    crowd: np.ndarray
    area: np.ndarray  # float64, as the file states it (panopticapi takes ground-truth areas from the JSON)
    labelling: Labelling | RleLabelling  # RLE strings (a table's) are decoded as they are swept
    source: str = "PNG"  # what the pixels came from, for messages: "PNG" or "table"


def batch_stats(image_ids: Sequence, gt: PanopticSide, pred: PanopticSide, n_categories: int, where: str) -> PQStats:
    """PQ statistics of a batch of images, exactly as panopticapi counts them, with no per-image Python.

    A match is a same-category (gt, pred) pair with IoU > 0.5, where the union leaves out the
    prediction's pixels on VOID; crowd ground truth never matches; an unmatched prediction lying more
    than half on VOID plus the last crowd segment of its class in its image is not a false positive.
    Ground-truth pixels whose id the JSON does not list (UNLISTED) match nothing and are not VOID.
    The semantic view (crowd and VOID ground truth ignored) comes from the same overlaps.
    """
    overlaps = Overlaps.of(gt.labelling, pred.labelling)
    n_pred = len(pred.image)
    on_pred = overlaps.pred >= 0
    pred_area = np.bincount(overlaps.pred[on_pred], overlaps.pixels[on_pred], n_pred).astype(np.int64)
    if isinstance(pred.labelling, Labelling) and pred.labelling.unlisted:
        position, segment = next(iter(pred.labelling.unlisted.items()))
        raise SegpipeError(f"{where}: image {image_ids[position]}: segment {segment} is in the PNG and not in the JSON")
    if n_pred and not pred_area.all():
        k = int(np.flatnonzero(pred_area == 0)[0])
        missing = "is in the JSON and not in the PNG" if pred.source == "PNG" else "has an empty mask"
        raise SegpipeError(f"{where}: image {image_ids[pred.image[k]]}: segment {pred.id[k]} {missing}")
    on_void = on_pred & (overlaps.gt == VOID)
    void = np.bincount(overlaps.pred[on_void], overlaps.pixels[on_void], n_pred).astype(np.int64)

    pairs = on_pred & (overlaps.gt >= 0)
    g, p, pixels = overlaps.gt[pairs], overlaps.pred[pairs], overlaps.pixels[pairs]
    candidate = (gt.category[g] == pred.category[p]) & (gt.category[g] >= 0) & ~gt.crowd[g]
    understated = np.flatnonzero(candidate & (gt.area[g] < pixels))
    if len(understated):  # panopticapi takes the JSON's area: an IoU above 1 (or a division by 0) would follow
        k = int(understated[0])
        raise SegpipeError(f"{where}: image {image_ids[gt.image[g[k]]]}: ground-truth segment {gt.id[g[k]]} has area "
                           f"{gt.area[g[k]]:g} in its JSON but shares {pixels[k]} pixels with predicted segment "
                           f"{pred.id[p[k]]}")
    # panopticapi: union = pred area + gt area (JSON) - intersection - pred on VOID, then a float division.
    union = ((pred_area[p] + gt.area[g]) - pixels) - void[p]
    with np.errstate(divide="ignore", invalid="ignore"):
        iou = np.where(candidate, pixels / np.where(candidate, union, 1.0), 0.0)
    match = candidate & (iou > 0.5)
    stats = PQStats.zeros(n_categories)
    stats.semantic = confusion_from_overlaps(overlaps, gt.category, gt.crowd, pred.category, n_categories)
    match_category = gt.category[g[match]]
    stats.tp += np.bincount(match_category, minlength=n_categories)
    units = (iou[match] * 2.0**_IOU_SCALE_BITS).astype(np.int64)  # exact: IoU in (0.5, 1] (areas checked above)
    high = np.bincount(match_category, units >> 26, n_categories).astype(np.int64)  # each sum < 2^53: exact
    low = np.bincount(match_category, units & ((1 << 26) - 1), n_categories).astype(np.int64)
    stats.iou += np.array([(int(h) << 26) + int(lo) for h, lo in zip(high, low)], object)

    gt_matched = np.zeros(len(gt.image), bool)
    gt_matched[g[match]] = True
    pred_matched = np.zeros(n_pred, bool)
    pred_matched[p[match]] = True
    missed = ~gt_matched & ~gt.crowd & (gt.category >= 0)
    stats.fn += np.bincount(gt.category[missed], minlength=n_categories)

    ignored = void + _on_last_crowd(gt, pred, g, p, pixels)
    false_positive = ~pred_matched & (2 * ignored <= pred_area)  # panopticapi: ignored / area > 0.5 is not an FP
    stats.fp += np.bincount(pred.category[false_positive], minlength=n_categories)
    return stats


def _on_last_crowd(gt: PanopticSide, pred: PanopticSide, g: np.ndarray, p: np.ndarray, pixels: np.ndarray) -> np.ndarray:
    """Each prediction's pixels on the last crowd segment of its class in its image (panopticapi keeps a
    dict category -> crowd segment, so a later crowd of the same class replaces an earlier one)."""
    crowd = np.flatnonzero(gt.crowd & (gt.category >= 0))
    n_categories = int(max(gt.category.max(initial=0), pred.category.max(initial=0))) + 1
    key = gt.image[crowd] * n_categories + gt.category[crowd]
    last = np.zeros(len(gt.image), bool)
    if len(crowd):
        reverse = crowd[::-1]
        _, first_in_reverse = np.unique(key[::-1], return_index=True)
        last[reverse[first_in_reverse]] = True
    on = last[g] & (gt.category[g] == pred.category[p])
    return np.bincount(p[on], pixels[on], len(pred.image)).astype(np.int64)


def image_stats(image_id: object, gt_ids: np.ndarray, gt_segments: Sequence[dict], pred_ids: np.ndarray,
                pred_segments: Sequence[dict], category_index: dict[int, int], where: str,
                drop_unknown_categories: bool = False) -> PQStats:
    """PQ statistics of one image from panoptic id maps and their `segments_info` (see `batch_stats`)."""
    if gt_ids.shape != pred_ids.shape:
        raise SegpipeError(f"{where}: image {image_id}: prediction is {pred_ids.shape[0]}x{pred_ids.shape[1]} "
                           f"(HxW), ground truth is {gt_ids.shape[0]}x{gt_ids.shape[1]}")
    gt = png_side([gt_segments], [gt_ids], category_index, truth=True, where=[where], image_ids=[image_id])
    pred = png_side([pred_segments], [pred_ids], category_index, truth=False, where=[where], image_ids=[image_id],
                    drop_unknown=drop_unknown_categories)
    return batch_stats([image_id], gt, pred, len(category_index), where)


# --- building sides from id maps (PNG) and from RLE rows (tables) -----------------------------------


def _segment_arrays(segments_per_image: Sequence[Sequence[dict]], category_index: dict[int, int], truth: bool,
                    where: Sequence[str], image_ids: Sequence) -> tuple[np.ndarray, ...]:
    image, ids, category, crowd, area = [], [], [], [], []
    for position, segments in enumerate(segments_per_image):
        seen = set()
        for s in segments:
            if s["id"] in seen:
                raise SegpipeError(f"{where[position]}: image {image_ids[position]}: duplicate segment id {s['id']}")
            if not (isinstance(s["id"], int) and 0 < s["id"] <= MAX_SEGMENT_ID):  # 0 is VOID in the PNG
                raise SegpipeError(f"{where[position]}: image {image_ids[position]}: segment id {s['id']!r} is not in "
                                   f"1..{MAX_SEGMENT_ID} (0 is VOID)")
            seen.add(s["id"])
            index = category_index.get(s["category_id"], -1)
            if index < 0 and not truth:
                raise SegpipeError(f"{where[position]}: image {image_ids[position]}: segment {s['id']} has unknown "
                                   f"category_id {s['category_id']} (--drop-unknown-categories makes such "
                                   "segments VOID)")
            image.append(position)
            ids.append(s["id"])
            category.append(index)
            crowd.append(s.get("iscrowd", 0) == 1)
            area.append(s["area"] if truth else 0)
    return (np.asarray(image, np.int64), np.asarray(ids, np.int64), np.asarray(category, np.int64),
            np.asarray(crowd, bool), np.asarray(area, np.float64))


def png_side(segments_per_image: Sequence[Sequence[dict]], id_maps, category_index: dict[int, int], truth: bool,
             where: Sequence[str], image_ids: Sequence, drop_unknown: bool = False) -> PanopticSide:
    """A side from `segments_info` lists and their id maps (an iterable: maps are reduced to runs one by one).

    With `drop_unknown`, predicted segments of categories the ground truth lacks become VOID pixels.
    """
    if drop_unknown:
        unknown = [[s["id"] for s in segments if s["category_id"] not in category_index] for segments in segments_per_image]
        segments_per_image = [[s for s in segments if s["category_id"] in category_index] for segments in segments_per_image]
        id_maps = (_void(ids, void) for ids, void in zip(id_maps, unknown))
    image, ids, category, crowd, area = _segment_arrays(segments_per_image, category_index, truth, where, image_ids)
    labelling = Labelling.from_id_maps(id_maps, [[s["id"] for s in segments] for segments in segments_per_image])
    return PanopticSide(image, ids, category, crowd, area, labelling)


def _void(ids: np.ndarray, segment_ids: list[int]) -> np.ndarray:
    if segment_ids:
        ids = np.where(np.isin(ids & 0xFFFFFF, segment_ids), 0, ids)
    return ids


def table_side(rows, positions: np.ndarray, n_images: int, category_index: dict[int, int], truth: bool,
               where: str, image_ids: Sequence, drop_unknown: bool = False) -> PanopticSide:
    """A side from table rows (image_id, segment_id, category_id, iscrowd, area, rle), `positions` giving each
    row's image in the batch; masks come straight from the RLE strings, nothing is painted. With
    `drop_unknown`, predicted segments of categories the ground truth lacks are left out (their pixels VOID)."""
    if (np.diff(positions) < 0).any():
        order = np.argsort(positions, kind="stable")
        rows, positions = rows.take(order), positions[order]
    categories = rows.column("category_id").to_numpy()
    category = index_of(list(category_index), categories)  # the index enumerates the category list
    if drop_unknown and not truth and (category < 0).any():
        known = category >= 0
        rows, positions, categories, category = rows.filter(pa.array(known)), positions[known], categories[known], category[known]
    ids = rows.column("segment_id").to_numpy()
    if not truth and (category < 0).any():
        k = int(np.flatnonzero(category < 0)[0])
        raise SegpipeError(f"{where}: image {image_ids[positions[k]]}: segment {ids[k]} has unknown category_id "
                           f"{categories[k]}")
    _check_unique(positions, ids, where, image_ids)
    heights, widths = np.ones(n_images, np.int64), np.ones(n_images, np.int64)
    row_heights, row_widths = rows.column("height").to_numpy(), rows.column("width").to_numpy()
    heights[positions], widths[positions] = row_heights, row_widths
    differ = np.flatnonzero((heights[positions] != row_heights) | (widths[positions] != row_widths))
    if len(differ):
        k = int(differ[0])
        raise SegpipeError(f"{where}: image {image_ids[positions[k]]}: segment {ids[k]} says the image is "
                           f"{row_heights[k]}x{row_widths[k]} (HxW), another of its segments says "
                           f"{heights[positions[k]]}x{widths[positions[k]]}")
    try:
        labelling = RleLabelling.of(arrow_strings(rows.column("rle")), positions, heights, widths)
    except RleError as error:  # a null RLE; the strings themselves are checked as they are swept
        raise SegpipeError(_rle_message(error, where, image_ids, positions, ids)) from None
    area = rows.column("area").to_numpy().astype(np.float64) if truth else np.zeros(len(ids))
    return PanopticSide(positions, ids, category, rows.column("iscrowd").to_numpy(zero_copy_only=False).astype(bool),
                        area, labelling, "table")


def _rle_message(error: RleError, where: str, image_ids: Sequence, positions: np.ndarray, ids: np.ndarray) -> str:
    k = error.index
    what = str(error) if isinstance(error, RleSizeError) else f"malformed RLE ({error})"
    return f"{where}: image {image_ids[positions[k]]}: segment {ids[k]}: {what}"


def _check_unique(positions: np.ndarray, ids: np.ndarray, where: str, image_ids: Sequence) -> None:
    if len(ids) < 2:
        return
    key = positions.astype(np.int64) << 32 | ids.astype(np.int64)
    ordered = np.sort(key)
    repeated = ordered[1:][ordered[1:] == ordered[:-1]]
    if len(repeated):
        raise SegpipeError(f"{where}: image {image_ids[int(repeated[0] >> 32)]}: duplicate segment id "
                           f"{int(repeated[0] & 0xFFFFFFFF)}")


def summarize(stats: PQStats, categories: Sequence[dict]) -> dict:
    """All / Things / Stuff averages over the classes that occur, and per-class figures.

    A class enters the averages where it has a TP, FP or FN, as in panopticapi; per_class lists every
    class, zeros where it does not occur. A group with no occurring class (Stuff in a things-only
    dataset) reports zeros with n = 0 where panopticapi divides by zero. `semantic` is `segpipe eval
    miou`'s result for the semantic view of the same segmentations.
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
        members = [occurring[c["id"]] for c in categories  # panopticapi: a thing is isthing == 1
                   if c["id"] in occurring and (isthing is None or (c.get("isthing") == 1) == isthing)]
        n = len(members)
        result[name] = {key: (sum(m[key] for m in members) / n if n else 0.0) for key in ("pq", "sq", "rq")}
        result[name]["n"] = n
    result["per_class"] = per_class
    result["semantic"] = miou.summarize(stats.semantic, [c.get("name", str(c["id"])) for c in categories])
    return result


def format_table(result: dict) -> str:
    """The summary table panopticapi prints, scores in percent."""
    lines = [f"{'':10}|    PQ     SQ     RQ     N", "-" * 38]
    for name in ("All", "Things", "Stuff"):
        r = result[name]
        lines.append(f"{name:10}| {100 * r['pq']:5.1f}  {100 * r['sq']:5.1f}  {100 * r['rq']:5.1f}  {r['n']:4d}")
    semantic = result["semantic"]
    if semantic["mIoU"] is not None:
        lines.append(f"semantic view: mIoU {100 * semantic['mIoU']:.1f}, pixel accuracy {100 * semantic['aAcc']:.1f}")
    return "\n".join(lines)


# --- datasets: ground truth and predictions as COCO panoptic JSON + PNGs or as tables, in any combination ---


@dataclass(frozen=True)
class _PngSource:
    """A COCO panoptic JSON's side: its `segments_info` travel in the shard, the task reads the PNGs."""

    folder: str


@dataclass(frozen=True)
class _TableSource:
    """A table's side: the task reads its shard's rows with a pushed-down filter."""

    name: str  # a dataset table's folder (read through open_dataset_table), or a predictions table
    files: tuple[str, ...] = ()  # the predictions table's Parquet files; () for a dataset table

    def rows(self, image_ids: Sequence, columns: list[str]):
        if self.files:  # the shard is a run of sorted ids and strays were refused: the range is exact
            return read_rows(self.files, image_ids[0], image_ids[-1], columns)
        return open_dataset_table(self.name).segments(image_ids, columns)

    def scan(self, columns: list[str]) -> pa.Table:
        """A few columns of every row (the driver's checks)."""
        if not self.files:
            return open_dataset_table(self.name).segments(columns=columns)
        return pa.concat_tables([read_columns(uri, columns) for uri in self.files])


@dataclass(frozen=True)
class _Shard:
    """Images one task evaluates, in the ground truth's order, with the JSON entries of JSON sides."""

    image_ids: tuple
    gt_entries: tuple  # per image: the panoptic annotation (JSON sources) or None (tables)
    pred_entries: tuple
    gt: _PngSource | _TableSource
    pred: _PngSource | _TableSource
    category_index: dict[int, int]
    drop_unknown: bool  # predicted segments of categories the ground truth lacks become VOID


@without_cyclic_gc
def evaluate_pq(gt: str, pred: str, gt_dir: str | None = None, pred_dir: str | None = None, workers: int = 1,
                address: str | None = None, shard_size: int = 500, drop_unknown_categories: bool = False,
                threads: int | None = None, progress: Progress = quiet) -> dict:
    """PQ of predictions against ground truth, each a COCO panoptic JSON (+ PNG folder) or a segpipe table.

    Ground truth: a COCO panoptic JSON or a panoptic dataset table (`segpipe convert`). Predictions: a COCO
    panoptic JSON, the predictions table of `segpipe infer` (file or folder), or a dataset table. Tables are
    read a shard at a time with a filter and intersected straight from their RLE runs. The statistics are
    exact integers, so the output depends only on the inputs, never on `workers`, `threads`, `address` or shards.
    Predicted segments of categories the ground truth lacks are refused, or with `drop_unknown_categories`
    made VOID (what training validation does with a model that knows more classes); `dropped_segments`
    counts them.
    """
    categories, image_ids, gt_entries, gt_source = _ground_truth(gt, gt_dir)
    category_index = {c["id"]: i for i, c in enumerate(categories)}
    pred_entries, pred_source, dropped = _predictions(pred, pred_dir, image_ids, category_index, drop_unknown_categories)
    shards = [_Shard(tuple(image_ids[i:i + shard_size]), tuple(gt_entries[i:i + shard_size]),
                     tuple(pred_entries[i:i + shard_size]), gt_source, pred_source, category_index,
                     drop_unknown_categories)
              for i in range(0, len(image_ids), shard_size)]
    total = PQStats.zeros(len(categories))
    for stats in map_shards(_evaluate_shard, shards, workers, address, threads,
                            progress=per_shard(progress, len(shards))):
        total += stats
    return {**summarize(total, categories), "dropped_segments": dropped}


def _ground_truth(gt: str, gt_dir: str | None) -> tuple[list[dict], list, list, _PngSource | _TableSource]:
    if is_dataset_table(gt):
        table = open_dataset_table(gt)
        if table.kind != "panoptic":
            raise SegpipeError(f"{gt}: a table of COCO {table.kind}, not panoptic (use `segpipe eval ap`)")
        _check_isthing(table.categories, gt)
        images = table.images(columns=["image_id", "panoptic_file_name"])
        annotated = images.filter(images.column("panoptic_file_name").is_valid())
        ids = annotated.column("image_id").to_pylist()
        return table.categories, ids, [None] * len(ids), _TableSource(gt)
    data = read_json(gt)
    if not isinstance(data, dict) or not all(isinstance(data.get(k), list) for k in ("annotations", "categories", "images")):
        raise SegpipeError(f"{gt}: not a COCO panoptic file (needs 'images', 'annotations', 'categories')")
    check_integer_ids([a.get("image_id") for a in data["annotations"]], gt)
    _check_isthing(data["categories"], gt)
    # Sorted by image id, as tables are: each shard is then a run of ids (the sums are exact, so order is free).
    annotations = sorted(data["annotations"], key=lambda a: a["image_id"])
    return data["categories"], [a["image_id"] for a in annotations], annotations, _PngSource(gt_dir or default_folder(gt))


def _check_isthing(categories: list, where: str) -> None:
    """Things and Stuff are told apart by `isthing` (panopticapi reads it and fails without it)."""
    missing = next((c for c in categories if "isthing" not in c), None)
    if missing is not None:
        raise SegpipeError(f"{where}: category {missing.get('id')} has no 'isthing' (COCO panoptic categories need it)")


def _predictions(pred: str, pred_dir: str | None, image_ids: list, category_index: dict, drop: bool
                 ) -> tuple[list, _PngSource | _TableSource, int]:
    """Per image the JSON entry (None for tables), the source, and how many segments have unknown categories."""
    files = () if is_dataset_table(pred) else tuple(parquet_files(pred))
    if files or is_dataset_table(pred):
        source = _TableSource(pred, files)
        columns = source.scan(["image_id", "segment_id", "category_id"])
        if not columns.num_rows:
            raise SegpipeError(f"{pred}: the predictions table is empty")
        refuse_strays(set(columns["image_id"].to_pylist()), image_ids, pred, "prediction")
        unknown = np.flatnonzero(index_of(list(category_index), columns["category_id"].to_numpy()) < 0)
        if len(unknown) and not drop:
            k = int(unknown[0])
            _refuse_unknown(pred, columns["image_id"][k], columns["segment_id"][k], columns["category_id"][k])
        return [None] * len(image_ids), source, len(unknown)
    data = read_json(pred)
    if not isinstance(data, dict) or not isinstance(data.get("annotations"), list):
        raise SegpipeError(f"{pred}: not a COCO panoptic predictions file (no 'annotations' list)")
    if not data["annotations"]:
        raise SegpipeError(f"{pred}: holds no predictions")
    by_image = {a.get("image_id"): a for a in data["annotations"]}
    refuse_strays(by_image.keys(), image_ids, pred, "prediction")
    missing = [i for i in image_ids if i not in by_image]
    if missing:
        raise SegpipeError(f"{pred}: no prediction for image {missing[0]}"
                           + (f" (and {len(missing) - 1} more)" if len(missing) > 1 else ""))
    unknown = [(a["image_id"], s) for a in data["annotations"] for s in a.get("segments_info", [])
               if s.get("category_id") not in category_index]
    if unknown and not drop:
        _refuse_unknown(pred, unknown[0][0], unknown[0][1].get("id"), unknown[0][1].get("category_id"))
    return [by_image[i] for i in image_ids], _PngSource(pred_dir or default_folder(pred)), len(unknown)


def _refuse_unknown(where: str, image_id, segment_id, category_id) -> None:
    raise SegpipeError(f"{where}: image {image_id}: segment {segment_id} has unknown category_id {category_id} "
                       "(--drop-unknown-categories makes such segments VOID)")


@without_cyclic_gc
def _evaluate_shard(shard: _Shard) -> PQStats:
    gt, gt_shapes = _read_side(shard.gt, shard, shard.gt_entries, truth=True)
    pred, pred_shapes = _read_side(shard.pred, shard, shard.pred_entries, truth=False)
    known = (gt_shapes[:, 0] >= 0) & (pred_shapes[:, 0] >= 0)
    differ = np.flatnonzero(known & (gt_shapes != pred_shapes).any(axis=1))
    if len(differ):
        k = int(differ[0])
        (ph, pw), (gh, gw) = pred_shapes[k], gt_shapes[k]
        where = _where(shard.pred, shard.pred_entries[k])
        raise SegpipeError(f"{where}: image {shard.image_ids[k]}: prediction is {ph}x{pw} (HxW), ground truth is {gh}x{gw}")
    where = shard.pred.name if isinstance(shard.pred, _TableSource) else "predictions"
    try:
        return batch_stats(shard.image_ids, gt, pred, len(shard.category_index), where)
    except OverlapError as error:  # only a table's segments can overlap
        source = shard.gt if error.side == "gt" else shard.pred
        raise SegpipeError(f"{source.name}: image {shard.image_ids[error.image]}: segments overlap, so this is not a "
                           f"panoptic segmentation (instance predictions? use `segpipe eval ap`)") from None
    except RleError as error:  # a table's RLE strings are checked as they are swept
        side, source = (gt, shard.gt) if error.side == "gt" else (pred, shard.pred)
        raise SegpipeError(_rle_message(error, source.name, shard.image_ids, side.image, side.id)) from None


def _where(source: _PngSource | _TableSource, entry: dict | None) -> str:
    return source.name if isinstance(source, _TableSource) else join(source.folder, entry["file_name"])


def _read_side(source: _PngSource | _TableSource, shard: _Shard, entries: tuple, truth: bool
               ) -> tuple[PanopticSide, np.ndarray]:
    """One side of the shard and each image's (height, width); -1 for an image a table has no rows of."""
    n = len(shard.image_ids)
    shapes = np.full((n, 2), -1, np.int64)
    if isinstance(source, _TableSource):
        rows = source.rows(shard.image_ids, ["image_id", "segment_id", "category_id", "iscrowd", "area", "rle",
                                             "height", "width"])
        positions = np.searchsorted(np.asarray(shard.image_ids), rows.column("image_id").to_numpy())  # ids sorted
        shapes[positions, 0] = rows.column("height").to_numpy()
        shapes[positions, 1] = rows.column("width").to_numpy()
        side = table_side(rows, positions, n, shard.category_index, truth, source.name, shard.image_ids,
                          drop_unknown=shard.drop_unknown and not truth)
        return side, shapes

    folder = _Folder(source.folder)

    def id_maps():
        for k, entry in enumerate(entries):
            ids = panoptic_words(folder.read(entry["file_name"]), _where(source, entry))
            shapes[k] = ids.shape
            yield ids

    segments = [entry.get("segments_info", []) for entry in entries]
    where = [_where(source, entry) for entry in entries]
    return png_side(segments, id_maps(), shard.category_index, truth, where, shard.image_ids,
                    drop_unknown=shard.drop_unknown and not truth), shapes


class _Folder:
    """Files of one folder, its filesystem resolved once rather than per file."""

    def __init__(self, uri: str) -> None:
        self.uri = uri
        self.fs, self.root = url_to_fs(uri)

    def read(self, name: str) -> bytes:
        try:
            return self.fs.cat_file(f"{self.root.rstrip('/')}/{name}")
        except FileNotFoundError:
            raise SegpipeError(f"{self.uri.rstrip('/')}/{name}: no such file") from None
