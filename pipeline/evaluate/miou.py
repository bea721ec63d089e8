"""Semantic segmentation metrics (IoU per class, mIoU, fwIoU, aAcc, mAcc) from confusion matrices that add."""

from __future__ import annotations

import io
from collections.abc import Sequence
from dataclasses import dataclass

import numba
import numpy as np
import pyspng

from pipeline.errors import SegpipeError
from pipeline.evaluate.match import Overlaps
from pipeline.evaluate.runner import map_shards
from pipeline.io.tables import is_dataset_table
from pipeline.progress import Progress, per_shard, quiet


@dataclass
class ConfusionStats:
    """Pixel counts, exact: rows are ground-truth classes, columns predicted classes, then one VOID column.

    The VOID column holds ground-truth pixels the prediction leaves unlabelled (a panoptic prediction's
    VOID, a semantic prediction's ignore value): they count against the ground-truth class's IoU and
    accuracy and are nobody's prediction. Ignored ground-truth pixels are in no cell.
    """

    matrix: np.ndarray  # int64, (K, K + 1)

    @classmethod
    def zeros(cls, n_classes: int) -> ConfusionStats:
        return cls(np.zeros((n_classes, n_classes + 1), np.int64))

    def __iadd__(self, other: ConfusionStats) -> ConfusionStats:
        self.matrix += other.matrix
        return self


def image_confusion(gt: np.ndarray, pred: np.ndarray, n_classes: int, ignore_index: int, where: str) -> ConfusionStats:
    """The confusion of one pair of label maps; a prediction pixel equal to `ignore_index` is VOID."""
    _check_same_size(gt, pred, where)
    stats = ConfusionStats.zeros(n_classes)
    kind = np.promote_types(gt.dtype, pred.dtype) if gt.dtype != pred.dtype else gt.dtype
    kind = kind if kind in (np.uint8, np.uint16) else np.int64
    labels = [np.require(a, kind, "CW").ravel() for a in (gt, pred)]  # the kernel takes writable C arrays
    if _add_pixels(*labels, n_classes, ignore_index, stats.matrix):
        return stats
    for side, labels in (("ground truth", gt), ("prediction", pred)):  # the slow path says what is wrong
        stray = labels[(labels >= n_classes) & (labels != ignore_index)]
        if stray.size:
            raise SegpipeError(f"{where}: {side} has class index {int(stray.max())}, not below {n_classes} "
                               f"classes nor the ignore value {ignore_index}")
    raise SegpipeError(f"{where}: a class index below 0")


@numba.njit([f"b1({t}[:], {t}[:], i8, i8, i8[:, :])" for t in ("u1", "u2", "i8")], cache=True, nogil=True)
def _add_pixels(gt, pred, n_classes, ignore_index, matrix):
    """Count every valid pixel into `matrix` in one pass; False at the first label that is neither a class
    nor the ignore value, on either side (the counts are then left half done and thrown away)."""
    for i in range(len(gt)):
        g, p = np.int64(gt[i]), np.int64(pred[i])
        if p == ignore_index:
            p = n_classes
        elif p >= n_classes or p < 0:
            return False
        if g != ignore_index:
            if g >= n_classes or g < 0:
                return False
            matrix[g, p] += 1
    return True


def _check_same_size(gt: np.ndarray, pred: np.ndarray, where: str) -> None:
    if gt.shape[:2] != pred.shape[:2]:
        raise SegpipeError(f"{where}: prediction is {pred.shape[0]}x{pred.shape[1]} (HxW), "
                           f"ground truth is {gt.shape[0]}x{gt.shape[1]}")


def confusion_from_overlaps(overlaps: Overlaps, gt_category: np.ndarray, gt_crowd: np.ndarray,
                            pred_category: np.ndarray, n_classes: int) -> ConfusionStats:
    """The semantic view of a panoptic batch, from the matcher's overlaps: no pixel is visited.

    `gt_category` / `pred_category` give the class index of each segment of the batch (the labels of
    `overlaps`), `gt_crowd` whether a ground-truth segment is crowd. Ground truth that is VOID, unlisted,
    crowd or of a class below 0 is ignored; a prediction that is VOID, unlisted or of a class below 0
    goes to the VOID column.
    """
    stats = ConfusionStats.zeros(n_classes)
    labelled = overlaps.gt >= 0
    gt_label = overlaps.gt[labelled]
    rows = np.asarray(gt_category, np.int64)[gt_label]
    keep = (rows >= 0) & ~np.asarray(gt_crowd, bool)[gt_label]
    rows, pred_label, pixels = rows[keep], overlaps.pred[labelled][keep], overlaps.pixels[labelled][keep]
    cols = np.full(len(pred_label), n_classes, np.int64)
    predicted = pred_label >= 0
    cols[predicted] = np.asarray(pred_category, np.int64)[pred_label[predicted]]
    cols[cols < 0] = n_classes
    np.add.at(stats.matrix, (rows, cols), pixels)
    return stats


def summarize(stats: ConfusionStats, classes: Sequence[str]) -> dict:
    """mIoU, fwIoU, aAcc and mAcc (fractions) and per-class IoU and accuracy; null where undefined.

    The definitions of mmsegmentation's IoUMetric and detectron2's SemSegEvaluator:
    IoU = TP / (GT + predicted - TP), accuracy = TP / GT, aAcc = sum TP / sum GT. A class's IoU is null
    when it is in neither the ground truth nor the prediction, its accuracy null when it is not in the
    ground truth; the means leave nulls out. So a class predicted but absent from the ground truth
    enters mIoU with IoU 0, as in mmsegmentation and torchmetrics (detectron2 leaves it out of mIoU).
    fwIoU is detectron2's: the IoUs weighted by each class's share of the ground-truth pixels.
    """
    matrix = stats.matrix
    n = len(classes)
    tp = np.diagonal(matrix[:, :n]).astype(np.float64)
    gt = matrix.sum(axis=1).astype(np.float64)  # with the pixels predicted VOID
    predicted = matrix[:, :n].sum(axis=0).astype(np.float64)
    union = gt + predicted - tp
    iou = [float(tp[c] / union[c]) if union[c] else None for c in range(n)]
    acc = [float(tp[c] / gt[c]) if gt[c] else None for c in range(n)]
    total = float(gt.sum())
    scored = [c for c in range(n) if iou[c] is not None]
    return {
        "mIoU": _mean([iou[c] for c in scored]),
        "fwIoU": float(sum(gt[c] / total * iou[c] for c in scored)) if total else None,
        "aAcc": float(tp.sum() / total) if total else None,
        "mAcc": _mean([a for a in acc if a is not None]),
        "n": len(scored),
        "pixels": int(total),
        "per_class": [{"name": name, "iou": iou[c], "acc": acc[c], "gt_pixels": int(gt[c]),
                       "pred_pixels": int(predicted[c])} for c, name in enumerate(classes)],
    }


def _mean(values: list[float]) -> float | None:
    return sum(values) / len(values) if values else None


def format_table(result: dict) -> str:
    """A short summary, scores in percent, and the classes with the lowest IoU."""
    def percent(value):
        return f"{100 * value:6.2f}" if value is not None else f"{'-':>6}"

    lines = [f"mIoU {percent(result['mIoU'])}   fwIoU {percent(result['fwIoU'])}   aAcc {percent(result['aAcc'])}"
             f"   mAcc {percent(result['mAcc'])}   ({result['n']} classes, {result['pixels']} pixels)"]
    worst = sorted((c for c in result["per_class"] if c["iou"] is not None), key=lambda c: c["iou"])[:5]
    lines += [f"  lowest IoU  {percent(c['iou'])}  {c['name']}" for c in worst]
    return "\n".join(lines)


# --- class lists -----------------------------------------------------------------------------------


def load_classes(spec: int | str | Sequence[str]) -> list[str]:
    """Class names from a count, a list, or a JSON file (a list of names, or COCO-style categories).

    Class index k is the k-th name (mmsegmentation's convention), whatever a category's id.
    """
    from pipeline.io.fs import read_json

    if isinstance(spec, str) and spec.isdigit():
        spec = int(spec)
    if isinstance(spec, int):
        if spec < 1:
            raise SegpipeError(f"--classes {spec}: need at least 1 class")
        return [str(k) for k in range(spec)]
    if not isinstance(spec, str):
        return [str(name) for name in spec]
    found = read_json(spec)
    if isinstance(found, dict) and isinstance(found.get("categories"), list) and found["categories"]:
        return [str(c.get("name", c.get("id"))) if isinstance(c, dict) else str(c) for c in found["categories"]]
    if isinstance(found, list) and found and all(isinstance(name, str) for name in found):
        return found
    raise SegpipeError(f"{spec}: expected a list of class names or a COCO-style {{\"categories\": [...]}}")


# --- semantic label PNG folders --------------------------------------------------------------------


def read_label_png(data: bytes, where: str) -> np.ndarray:
    """A single-channel label PNG (8- or 16-bit grey, or palette indices) as an array of class indices."""
    from PIL import Image

    if data[:8] == b"\x89PNG\r\n\x1a\n" and data[12:16] == b"IHDR" and data[24:26] == b"\x08\x00":
        try:  # 8-bit grey, the usual label PNG: pyspng decodes it about 3x faster than Pillow
            return pyspng.load(data)
        except Exception:  # pyspng raises a bare Exception for corrupt data: Pillow says what is wrong below
            pass

    try:
        image = Image.open(io.BytesIO(data))
        if image.format != "PNG":
            raise SegpipeError(f"{where}: is a {image.format} file, not a PNG")
        if image.mode not in ("L", "P", "I;16", "I;16B", "I"):
            raise SegpipeError(f"{where}: is a {image.mode} PNG; a label PNG has one channel of class indices")
        return np.asarray(image)
    except (OSError, SyntaxError, ValueError) as error:
        raise SegpipeError(f"{where}: cannot be read as a PNG ({error})") from None


@dataclass(frozen=True)
class _Shard:
    """File names one task evaluates, in both folders."""

    names: tuple[str, ...]
    gt_dir: str
    pred_dir: str
    n_classes: int
    ignore_index: int


def _evaluate_shard(shard: _Shard) -> ConfusionStats:
    from pipeline.io.fs import join, read_bytes

    stats = ConfusionStats.zeros(shard.n_classes)
    for name in shard.names:
        gt_uri, pred_uri = join(shard.gt_dir, name), join(shard.pred_dir, name)
        gt = read_label_png(read_bytes(gt_uri), gt_uri)
        pred = read_label_png(read_bytes(pred_uri), pred_uri)
        stats += image_confusion(gt, pred, shard.n_classes, shard.ignore_index, pred_uri)
    return stats


def _png_names(folder: str) -> set[str]:
    from pipeline.io.fs import is_hidden, url_to_fs

    fs, root = url_to_fs(folder)
    if not fs.isdir(root):
        raise SegpipeError(f"{folder}: no such folder")
    return {path.rsplit("/", 1)[-1] for path in fs.ls(root, detail=False)
            if path.lower().endswith(".png") and not is_hidden(path.rsplit("/", 1)[-1])}


def evaluate_miou(gt: str, pred: str, classes: int | str | Sequence[str] | None = None, ignore_index: int = 255,
                  gt_dir: str | None = None, pred_dir: str | None = None, workers: int = 1,
                  address: str | None = None, shard_size: int = 50, threads: int | None = None,
                  progress: Progress = quiet) -> dict:
    """mIoU and friends of semantic label PNG folders, or of COCO panoptic ground truth (a JSON + PNGs or a
    dataset table) against any prediction `segpipe eval pq` reads: its semantic view, from the same overlaps.

    PNG folders pair files by name (every ground-truth file needs a prediction) and need `classes`;
    a panoptic GT brings its categories. Shards are fixed runs of `shard_size` images in file-name
    (or GT) order, added in that order: the output depends only on the inputs.
    """
    if gt.endswith(".json") or is_dataset_table(gt):
        if classes is not None:
            raise SegpipeError("--classes: a COCO panoptic ground truth brings its own categories; leave it out")
        from pipeline.evaluate.pq import evaluate_pq  # pq reports this view; imported here, as pq imports miou

        return evaluate_pq(gt, pred, gt_dir, pred_dir, workers, address, shard_size, threads=threads,
                           progress=progress)["semantic"]
    if classes is None:
        raise SegpipeError("--classes: give the class list (a JSON file) or the number of classes")
    names = load_classes(classes)
    gt_names = sorted(_png_names(gt))
    if not gt_names:
        raise SegpipeError(f"{gt}: holds no PNG files")
    pred_names = _png_names(pred)
    missing = [name for name in gt_names if name not in pred_names]
    if missing:
        raise SegpipeError(f"{pred}: no prediction {missing[0]}"
                           + (f" (and {len(missing) - 1} more)" if len(missing) > 1 else ""))
    shards = [_Shard(tuple(gt_names[i:i + shard_size]), gt, pred, len(names), ignore_index)
              for i in range(0, len(gt_names), shard_size)]
    total = ConfusionStats.zeros(len(names))
    for stats in map_shards(_evaluate_shard, shards, workers, address, threads,
                            progress=per_shard(progress, len(shards))):
        total += stats
    return summarize(total, names)
