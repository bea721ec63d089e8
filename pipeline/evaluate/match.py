"""The one matcher: per-image pixel intersections between ground-truth and predicted segments, from id maps or RLE runs.

Every metric starts here. A side of an image (its ground truth or its prediction) becomes a
*labelling*: disjoint pixel intervals of the image in column-major order (COCO RLE's order), each
carrying the index of the segment that owns it. Two labellings of an image are swept together once
(`Overlaps`), whatever they came from: a panoptic PNG (runs of equal ids) or the COCO RLE strings of
a table (decoded straight to runs, nothing painted). Overlapping masks (instances) are intersected
pair by pair instead (`pair_intersections`). Metrics keep only their own union rule and statistics.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field

import numba
import numpy as np

# The kernels are compiled with explicit signatures, so numba compiles them (or, after the first run, loads
# them from __pycache__) when this module is imported, like any compiled extension, not in the first call.

VOID = -1  # label of pixels no segment owns (id 0 in a panoptic PNG, or outside every mask)
UNLISTED = -2  # label of PNG pixels whose id the JSON does not list (panopticapi: neither VOID nor a segment)


# --- COCO compressed RLE strings to runs ---------------------------------------------------------


@dataclass(frozen=True)
class Runs:
    """Run lengths of many COCO RLE masks, flat: mask i's runs are `lengths[offsets[i]:offsets[i + 1]]`.

    Runs alternate background and foreground, background first, over the column-major pixels.
    """

    lengths: np.ndarray  # int64
    offsets: np.ndarray  # int64, one more than there are masks
    areas: np.ndarray  # foreground pixels of each mask
    totals: np.ndarray  # pixels each mask's runs cover (height * width for a well-formed mask)
    heights: np.ndarray | None = None  # each mask's height, where a consumer needs rows and columns

    def __len__(self) -> int:
        return len(self.offsets) - 1


class RleError(ValueError):
    """A malformed COCO RLE string; `index` says which of the batch."""

    def __init__(self, index: int, reason: str) -> None:
        super().__init__(reason)
        self.index = index


def decode_counts(data: np.ndarray, offsets: np.ndarray) -> Runs:
    """Decode COCO compressed RLE strings given as one byte buffer and string offsets (Arrow's layout).

    The format (pycocotools' rleToString): each run is a signed number in 6-bit groups, low bits
    first, written as chr(48 + group); bit 5 says another group follows, bit 4 of the last group is
    the sign; from the third run on, the number is the difference to the run two places back.
    """
    data = np.asarray(data, np.uint8)
    if not data.flags.writeable:  # the compiled kernel takes writable arrays; bytes objects give read-only ones
        data = data.copy()
    offsets = np.asarray(offsets, np.int64)
    lengths, run_offsets, areas, totals, bad, reason, where, value = _decode(data, offsets)
    if bad >= 0:
        if reason == 0:
            raise RleError(int(bad), "the counts string ends inside a run")
        if reason == 1:
            raise RleError(int(bad), f"character {chr(value)!r} at {where} is outside the RLE alphabet")
        raise RleError(int(bad), f"run {where} has negative length {value}" if reason == 2 else
                       f"run {where} is longer than 2^55")
    return Runs(lengths, run_offsets, areas, totals)


def decode_arrow(column) -> Runs:
    """`decode_counts` of an Arrow string column (array or chunked), straight from its buffers: no Python strings."""
    import pyarrow as pa

    array = column.combine_chunks() if isinstance(column, pa.ChunkedArray) else column
    array = array.cast(pa.large_string())  # 64-bit offsets, whatever the file stored
    if array.null_count:
        raise RleError(int(np.flatnonzero(array.is_null().to_numpy(zero_copy_only=False))[0]), "no mask (null RLE)")
    _, offsets, data = array.buffers()
    offsets = np.frombuffer(offsets, np.int64, len(array) + 1, array.offset * 8)
    data = np.frombuffer(data, np.uint8) if data is not None else np.zeros(0, np.uint8)
    return decode_counts(data, offsets)


def decode_strings(strings: Sequence[str | bytes]) -> Runs:
    """`decode_counts` of Python strings (a JSON file's `counts`); a non-ASCII character is outside the alphabet."""
    encoded = [s.encode("utf-8") if isinstance(s, str) else s for s in strings]
    offsets = np.zeros(len(encoded) + 1, np.int64)
    np.cumsum([len(s) for s in encoded], out=offsets[1:])
    return decode_counts(np.frombuffer(b"".join(encoded), np.uint8), offsets)


@numba.njit("Tuple((i8[:], i8[:], i8[:], i8[:], i8, i8, i8, i8))(u1[:], i8[:])", cache=True, nogil=True)
def _decode(data, offsets):
    """The runs of every string, with each mask's area and total; on a malformed string, its index, the
    reason (0 cut short, 1 bad character, 2 negative run, 3 too long) and where (character or run) and what."""
    n = len(offsets) - 1
    lengths = np.empty(len(data), np.int64)  # every run takes at least one character
    run_offsets = np.empty(n + 1, np.int64)
    areas = np.zeros(n, np.int64)
    totals = np.zeros(n, np.int64)
    k = 0
    for i in range(n):
        run_offsets[i] = k
        first, position, end = k, offsets[i], offsets[i + 1]
        while position < end:
            value, shift, more = 0, 0, True
            while more:
                if position >= end:
                    return lengths[:k], run_offsets, areas, totals, i, 0, 0, 0
                group = np.int64(data[position]) - 48
                if group < 0 or group >= 64:
                    return lengths[:k], run_offsets, areas, totals, i, 1, position - offsets[i], group + 48
                if shift > 55:
                    return lengths[:k], run_offsets, areas, totals, i, 3, k - first, 0
                value |= (group & 0x1F) << shift
                more = (group & 0x20) != 0
                position += 1
                shift += 5
                if not more and (group & 0x10) != 0:
                    value -= np.int64(1) << shift
            if k - first > 2:
                value += lengths[k - 2]
            if value < 0:
                return lengths[:k], run_offsets, areas, totals, i, 2, k - first, value
            lengths[k] = value
            totals[i] += value
            if (k - first) % 2 == 1:
                areas[i] += value
            k += 1
    run_offsets[n] = k
    return lengths[:k], run_offsets, areas, totals, -1, 0, 0, 0


# --- labellings: disjoint labelled intervals per image --------------------------------------------


@dataclass(frozen=True)
class Labelling:
    """One side of a batch of images: image i's intervals are `[offsets[i], offsets[i + 1])`, sorted.

    `label` is the segment's index in the batch's segment list, or UNLISTED; VOID pixels have no interval.
    """

    start: np.ndarray  # int64, column-major pixel index
    end: np.ndarray
    label: np.ndarray
    offsets: np.ndarray
    unlisted: dict = field(default_factory=dict)  # image position -> an id its map has and its list lacks

    @classmethod
    def from_runs(cls, runs: Runs, segment_image: np.ndarray, heights: np.ndarray) -> Labelling:
        """From each segment's RLE runs; `segment_image` (sorted) is the image of each segment, `heights`
        each image's height (intervals are ordered by column first, in linear time).

        Raises `OverlapError` naming the first image where two segments share a pixel.
        """
        n_images = len(heights)
        start, end, label, counts, overlapping = _label_runs(runs.lengths, runs.offsets,
                                                            np.asarray(segment_image, np.int64),
                                                            np.asarray(heights, np.int64))
        if overlapping >= 0:
            raise OverlapError(int(overlapping))
        offsets = np.zeros(n_images + 1, np.int64)
        np.cumsum(counts, out=offsets[1:])
        return cls(start, end, label, offsets)

    @classmethod
    def from_id_maps(cls, id_maps: Sequence[np.ndarray], segment_ids: Sequence[Sequence[int]]) -> Labelling:
        """From panoptic id maps (H x W; bits above 24, an RGBA decode's alpha, are ignored) and each
        image's listed segment ids, in order; segment k of image i gets label (segments before i) + k."""
        starts, ends, labels, counts, unlisted = [], [], [], [], {}
        base = 0
        for position, (ids, listed) in enumerate(zip(id_maps, segment_ids)):
            run_start, run_end, run_id = _id_runs(np.ascontiguousarray(ids.T, np.uint32).ravel())  # column-major
            index = index_of(listed, run_id)
            if (index < 0).any():
                unlisted[position] = int(run_id[np.argmax(index < 0)])
            starts.append(run_start)
            ends.append(run_end)
            labels.append(np.where(index >= 0, base + index, UNLISTED))
            counts.append(len(run_start))
            base += len(listed)
        offsets = np.zeros(len(counts) + 1, np.int64)
        np.cumsum(counts, out=offsets[1:])
        return cls(_cat(starts), _cat(ends), _cat(labels), offsets, unlisted)


def index_of(keys: Sequence[int], values: np.ndarray) -> np.ndarray:
    """Each value's position in `keys` (the first, for a repeated key), -1 where it is not there: one sort
    and a binary search, however many values (segment ids in a PNG, category ids in a table)."""
    keys = np.asarray(keys, np.int64)
    values = np.asarray(values, np.int64)
    if not len(keys):
        return np.full(len(values), -1, np.int64)
    order = np.argsort(keys, kind="stable")
    slot = np.minimum(np.searchsorted(keys[order], values), len(keys) - 1)
    return np.where(keys[order][slot] == values, order[slot], -1).astype(np.int64)


def measure(labelling: Labelling, n_segments: int, heights: Sequence[int]) -> tuple[np.ndarray, np.ndarray]:
    """Area and tight COCO box [x, y, w, h] of each of a labelling's `n_segments` segments, from its intervals
    (`heights`: each image's); zeros for a segment with no pixels, as pycocotools' toBbox gives."""
    keep = labelling.label >= 0
    label, start, end = labelling.label[keep], labelling.start[keep], labelling.end[keep] - 1
    image = np.searchsorted(labelling.offsets, np.flatnonzero(keep), "right") - 1
    height = np.asarray(heights, np.int64)[image]
    areas = np.bincount(label, end - start + 1, n_segments).astype(np.int64)
    x0, x1 = start // height, end // height
    wraps = x0 != x1  # an interval that runs into the next column covers every row
    y0, y1 = np.where(wraps, 0, start % height), np.where(wraps, height - 1, end % height)
    low, high = np.full((2, n_segments), np.iinfo(np.int64).max), np.full((2, n_segments), -1)
    np.minimum.at(low, (0, label), x0)
    np.minimum.at(low, (1, label), y0)
    np.maximum.at(high, (0, label), x1)
    np.maximum.at(high, (1, label), y1)
    boxes = np.zeros((n_segments, 4), np.int64)
    present = areas > 0
    boxes[present, :2] = low.T[present]
    boxes[present, 2:] = high.T[present] - low.T[present] + 1
    return areas, boxes


def _cat(parts: list[np.ndarray]) -> np.ndarray:
    return np.concatenate(parts).astype(np.int64) if parts else np.zeros(0, np.int64)


@numba.njit("UniTuple(i8[:], 3)(u4[:])", cache=True, nogil=True)
def _id_runs(flat):
    """Runs of equal ids (bits above 24 ignored) in a column-major flattened id map, VOID left out.

    Two passes (count, then fill) rather than growing arrays: arrays reassigned inside the loop cost numba
    reference counting on every pixel, 20x slower.
    """
    n = len(flat)
    runs = 0
    for position in range(n):
        if (position == 0 or (flat[position] ^ flat[position - 1]) & 0xFFFFFF) and flat[position] & 0xFFFFFF:
            runs += 1
    start, end, label = np.empty(runs, np.int64), np.empty(runs, np.int64), np.empty(runs, np.int64)
    k, current = -1, np.int64(0)
    for position in range(n):
        value = np.int64(flat[position] & 0xFFFFFF)
        if value != current or position == 0:
            if k >= 0 and current != 0:
                end[k] = position
            if value != 0:
                k += 1
                start[k], label[k] = position, value
            current = value
    if k >= 0 and current != 0:
        end[k] = n
    return start, end, label


class OverlapError(ValueError):
    """Two segments of one image share pixels where a panoptic segmentation needs disjoint segments."""

    def __init__(self, image: int) -> None:
        super().__init__(f"image position {image}: segments overlap")
        self.image = image


@numba.njit(cache=True, nogil=True)
def _order_by_column(start, end, label, height):
    """Sort one image's intervals by start in place: a counting sort by column, then insertion sort within
    each column (a column holds few intervals). False when two intervals overlap."""
    n = len(start)
    columns = start[n - 1] // height + 1
    for i in range(n):
        columns = max(columns, start[i] // height + 1)
    bucket = np.zeros(columns + 1, np.int64)
    for i in range(n):
        bucket[start[i] // height + 1] += 1
    for c in range(columns):
        bucket[c + 1] += bucket[c]
    order = np.empty(n, np.int64)
    for i in range(n):
        c = start[i] // height
        order[bucket[c]] = i
        bucket[c] += 1
    s, e, lab = start[order], end[order], label[order]
    for i in range(1, n):  # insertion sort: nearly sorted already
        j = i
        while j > 0 and s[j - 1] > s[j]:
            s[j - 1], s[j] = s[j], s[j - 1]
            e[j - 1], e[j] = e[j], e[j - 1]
            lab[j - 1], lab[j] = lab[j], lab[j - 1]
            j -= 1
    for i in range(n):
        start[i], end[i], label[i] = s[i], e[i], lab[i]
        if i and start[i] < end[i - 1]:
            return False
    return True


@numba.njit("Tuple((i8[:], i8[:], i8[:], i8[:], i8))(i8[:], i8[:], i8[:], i8[:])", cache=True, nogil=True)
def _label_runs(lengths, run_offsets, segment_image, heights):
    n_images, n_segments = len(heights), len(run_offsets) - 1
    total = 0
    for s in range(n_segments):
        total += (run_offsets[s + 1] - run_offsets[s]) // 2
    start = np.empty(total, np.int64)
    end = np.empty(total, np.int64)
    label = np.empty(total, np.int64)
    counts = np.zeros(n_images, np.int64)
    k = 0
    s = 0
    for image in range(n_images):
        first = k
        while s < n_segments and segment_image[s] == image:
            position = 0
            for r in range(run_offsets[s], run_offsets[s + 1]):
                length = lengths[r]
                if (r - run_offsets[s]) % 2 == 1 and length > 0:
                    start[k] = position
                    end[k] = position + length
                    label[k] = s
                    k += 1
                position += length
            s += 1
        counts[image] = k - first
        if k - first > 1 and not _order_by_column(start[first:k], end[first:k], label[first:k], heights[image]):
            return start[:k], end[:k], label[:k], counts, image
    return start[:k], end[:k], label[:k], counts, -1


# --- overlaps of two labellings ------------------------------------------------------------------


@dataclass(frozen=True)
class Overlaps:
    """Pixel counts of a batch's (ground-truth label, predicted label) pairs, one row per pair that meets.

    Labels are segment indices in the batch (VOID or UNLISTED otherwise); rows are sorted by image,
    then ground truth, then prediction. VOID meeting VOID is left out.
    """

    image: np.ndarray
    gt: np.ndarray
    pred: np.ndarray
    pixels: np.ndarray

    @classmethod
    def of(cls, gt: Labelling, pred: Labelling) -> Overlaps:
        """Sweep each image's two labellings together: O(intervals), no pixel is visited."""
        return cls(*_sweep(gt.start, gt.end, gt.label, gt.offsets, pred.start, pred.end, pred.label, pred.offsets))


@numba.njit(cache=True, nogil=True)
def _label_range(labels):
    """The smallest and largest segment label (VOID and UNLISTED aside); (0, -1) when there is none."""
    first, last = np.int64(0), np.int64(-1)
    for label in labels:
        if label >= 0:
            if last < first:
                first = last = label
            first, last = min(first, label), max(last, label)
    return first, last


@numba.njit(cache=True, nogil=True)
def _slot(label, first):
    return label + 2 - first if label >= 0 else label + 2


@numba.njit(cache=True, nogil=True)
def _unslot(slot, first):
    return slot - 2 + first if slot >= 2 else slot - 2


@numba.njit("UniTuple(i8[:], 4)(i8[:], i8[:], i8[:], i8[:], i8[:], i8[:], i8[:], i8[:])", cache=True, nogil=True)
def _sweep(g_start, g_end, g_label, g_offsets, p_start, p_end, p_label, p_offsets):
    n_images = len(g_offsets) - 1
    out = np.empty((4, len(g_start) + len(p_start) + 16), np.int64)  # rows: image, gt, pred, pixels
    k = 0
    for image in range(n_images):
        i0, i1, j0, j1 = g_offsets[image], g_offsets[image + 1], p_offsets[image], p_offsets[image + 1]
        # Rows and columns of the image's table: 0 UNLISTED, 1 VOID, 2 + k the k-th segment from the first.
        g_first, g_last = _label_range(g_label[i0:i1])
        p_first, p_last = _label_range(p_label[j0:j1])
        table = np.zeros((g_last - g_first + 3, p_last - p_first + 3), np.int64)
        i, j = i0, j0
        while i < i1 and j < j1:  # both lists are sorted and disjoint: a two-pointer walk
            low, high = max(g_start[i], p_start[j]), min(g_end[i], p_end[j])
            if low < high:
                table[_slot(g_label[i], g_first), _slot(p_label[j], p_first)] += high - low
            if g_end[i] < p_end[j]:
                i += 1
            else:
                j += 1
        # What a segment has beyond its overlaps with the other side's segments lies on that side's VOID.
        for i in range(i0, i1):
            table[_slot(g_label[i], g_first), 1] += g_end[i] - g_start[i]
        for j in range(j0, j1):
            table[1, _slot(p_label[j], p_first)] += p_end[j] - p_start[j]
        for r in range(table.shape[0]):
            for c in range(table.shape[1]):
                if r != 1 and c != 1:
                    table[r, 1] -= table[r, c]
                    table[1, c] -= table[r, c]
        if k + table.size > out.shape[1]:
            grown = np.empty((4, 2 * (k + table.size)), np.int64)
            grown[:, :k] = out[:, :k]
            out = grown
        for r in range(table.shape[0]):
            for c in range(table.shape[1]):
                if table[r, c]:
                    out[0, k], out[1, k], out[2, k], out[3, k] = image, _unslot(r, g_first), _unslot(c, p_first), table[r, c]
                    k += 1
    return out[0, :k].copy(), out[1, :k].copy(), out[2, :k].copy(), out[3, :k].copy()


# --- pairwise intersections of overlapping masks (instances) ------------------------------------


def pair_intersections(a: Runs, b: Runs, a_index: np.ndarray, b_index: np.ndarray) -> np.ndarray:
    """Pixels shared by masks `a[a_index[k]]` and `b[b_index[k]]`, for every pair k (masks of one size)."""
    return _intersect_pairs(a.lengths, a.offsets, b.lengths, b.offsets,
                            np.asarray(a_index, np.int64), np.asarray(b_index, np.int64))


@numba.njit("i8[:](i8[:], i8[:], i8[:], i8[:], i8[:], i8[:])", cache=True, nogil=True)
def _intersect_pairs(a_lengths, a_offsets, b_lengths, b_offsets, a_index, b_index):
    out = np.zeros(len(a_index), np.int64)
    for k in range(len(a_index)):
        # Walk both run lists at once, as pycocotools' rleIou does, counting pixels both cover.
        ra, ra_end = a_offsets[a_index[k]], a_offsets[a_index[k] + 1]
        rb, rb_end = b_offsets[b_index[k]], b_offsets[b_index[k] + 1]
        ca = a_lengths[ra] if ra < ra_end else 0
        cb = b_lengths[rb] if rb < rb_end else 0
        va = vb = False
        shared = 0
        while True:
            while ca == 0 and ra + 1 < ra_end:
                ra += 1
                ca = a_lengths[ra]
                va = not va
            while cb == 0 and rb + 1 < rb_end:
                rb += 1
                cb = b_lengths[rb]
                vb = not vb
            if ca == 0 or cb == 0:
                break
            c = min(ca, cb)
            if va and vb:
                shared += c
            ca -= c
            cb -= c
        out[k] = shared
    return out
