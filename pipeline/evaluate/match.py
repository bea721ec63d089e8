"""The one matcher: per-image pixel intersections between ground-truth and predicted segments, from id maps or RLE runs.

Every metric starts here. A side of an image (its ground truth or its prediction) becomes a
*labelling*: disjoint pixel intervals of the image in column-major order (COCO RLE's order), each
carrying the index of the segment that owns it. Two labellings of an image are swept together once
(`Overlaps`), whatever they came from: a panoptic PNG (runs of equal ids) or the COCO RLE strings of
a table (`RleLabelling`: decoded and checked image by image as they are swept, nothing painted, no
batch-sized intervals kept). Overlapping masks (instances) are intersected pair by pair instead
(`pair_intersections`). Metrics keep only their own union rule and statistics.
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
    """A malformed COCO RLE string; `index` says which of the batch (and `side`, "gt" or "pred", which side
    where `Overlaps.of` found it)."""

    def __init__(self, index: int, reason: str) -> None:
        super().__init__(reason)
        self.index = index
        self.side = ""


def decode_counts(data: np.ndarray, offsets: np.ndarray, keep_runs: bool = True) -> Runs:
    """Decode COCO compressed RLE strings given as one byte buffer and string offsets (Arrow's layout).

    The format (pycocotools' rleToString): each run is a signed number in 6-bit groups, low bits
    first, written as chr(48 + group); bit 5 says another group follows, bit 4 of the last group is
    the sign; from the third run on, the number is the difference to the run two places back.
    Without `keep_runs`, only the areas and totals come back (a check of the strings; `lengths` is empty).
    """
    data = np.asarray(data, np.uint8)
    if not data.flags.writeable:  # the compiled kernel takes writable arrays; bytes objects give read-only ones
        data = data.copy()
    offsets = np.asarray(offsets, np.int64)
    lengths, run_offsets, areas, totals, bad, reason, where, value = _decode(data, offsets, keep_runs)
    if bad >= 0:
        if reason == 1:
            raise RleError(int(bad), f"character {chr(value)!r} at {where} is outside the RLE alphabet")
        if reason == 2:
            raise RleError(int(bad), f"run {where} has negative length {value}")
        raise RleError(int(bad), "the counts string ends inside a run" if reason == 3 else
                       f"run {where} is longer than 2^55")
    return Runs(lengths, run_offsets, areas, totals)


def decode_arrow(column) -> Runs:
    """`decode_counts` of an Arrow string column (array or chunked), straight from its buffers: no Python strings."""
    return decode_counts(*arrow_strings(column))


def decode_strings(strings: Sequence[str | bytes]) -> Runs:
    """`decode_counts` of Python strings (a JSON file's `counts`); a non-ASCII character is outside the alphabet."""
    return decode_counts(*python_strings(strings))


def arrow_strings(column) -> tuple[np.ndarray, np.ndarray]:
    """An Arrow string column's (array or chunked) bytes and string offsets, as `decode_counts` takes them."""
    import pyarrow as pa

    array = column.combine_chunks() if isinstance(column, pa.ChunkedArray) else column
    array = array.cast(pa.large_string())  # 64-bit offsets, whatever the file stored
    if array.null_count:
        raise RleError(int(np.flatnonzero(array.is_null().to_numpy(zero_copy_only=False))[0]), "no mask (null RLE)")
    _, offsets, data = array.buffers()
    offsets = np.frombuffer(offsets, np.int64, len(array) + 1, array.offset * 8)
    data = np.frombuffer(data, np.uint8) if data is not None else np.zeros(0, np.uint8)
    return data, offsets


def python_strings(strings: Sequence[str | bytes]) -> tuple[np.ndarray, np.ndarray]:
    """Python strings' bytes and string offsets, as `decode_counts` takes them."""
    encoded = [s.encode("utf-8") if isinstance(s, str) else s for s in strings]
    offsets = np.zeros(len(encoded) + 1, np.int64)
    np.cumsum([len(s) for s in encoded], out=offsets[1:])
    return np.frombuffer(b"".join(encoded), np.uint8), offsets


@numba.njit(cache=True, nogil=True, inline="always")
def _number(data, position, end):
    """The number written from `position` on, and the position after it; failure 0, or 3 where the string ends
    inside it, 1 for a character outside the alphabet (then the character, and where), 4 past 2^55 bits."""
    value, shift, more = 0, 0, True
    while more:
        if position >= end:
            return 0, position, 3
        group = np.int64(data[position]) - 48
        if group < 0 or group >= 64:
            return group + 48, position, 1
        if shift > 55:
            return 0, position, 4
        value |= (group & 0x1F) << shift
        more = (group & 0x20) != 0
        position += 1
        shift += 5
        if not more and (group & 0x10) != 0:
            value -= np.int64(1) << shift
    return value, position, 0


@numba.njit("Tuple((i8[:], i8[:], i8[:], i8[:], i8, i8, i8, i8))(u1[:], i8[:], b1)", cache=True, nogil=True)
def _decode(data, offsets, keep_runs):
    """The runs of every string (if `keep_runs`), with each mask's area and total; on a malformed string, its
    index, the reason (1 bad character, 2 negative run, 3 cut short, 4 too long), where (character or run) and what."""
    n = len(offsets) - 1
    lengths = np.empty(len(data) if keep_runs else 0, np.int64)  # every run takes at least one character
    run_offsets = np.zeros(n + 1, np.int64)
    areas = np.zeros(n, np.int64)
    totals = np.zeros(n, np.int64)
    k = 0
    for i in range(n):
        run_offsets[i] = k
        position, end = offsets[i], offsets[i + 1]
        run, total, area, previous, before = 0, 0, 0, 0, 0
        while position < end:
            value, position, failure = _number(data, position, end)
            if failure == 1:
                return lengths[:k], run_offsets, areas, totals, i, 1, position - offsets[i], value
            if failure:
                return lengths[:k], run_offsets, areas, totals, i, failure, run, 0
            if run > 2:
                value += before  # the run two places back
            if value < 0:
                return lengths[:k], run_offsets, areas, totals, i, 2, run, value
            if keep_runs:
                lengths[k] = value
                k += 1
            total += value
            if run & 1:
                area += value
            before, previous = previous, value
            run += 1
        areas[i], totals[i] = area, total
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

    def __init__(self, image: int, side: str = "") -> None:
        super().__init__(f"image position {image}: segments overlap")
        self.image = image
        self.side = side  # "gt" or "pred", where `Overlaps.of` knows it


class RleSizeError(RleError):
    """A well-formed RLE string whose runs do not cover its image exactly."""


@dataclass(frozen=True)
class RleLabelling:
    """One side of a batch as the COCO RLE strings of disjoint segments, decoded image by image where it is
    swept, and checked there: the intervals of a batch are never all in memory at once (writing and reading
    them back costs more than the decoding). Segment s (a row of a table) is in image `segment_image[s]`
    and has label s.
    """

    data: np.ndarray  # uint8, the strings back to back
    offsets: np.ndarray  # int64, string s is data[offsets[s]:offsets[s + 1]]
    segment_image: np.ndarray  # int64, non-decreasing
    heights: np.ndarray  # int64, each image's
    widths: np.ndarray

    @classmethod
    def of(cls, strings: tuple[np.ndarray, np.ndarray], segment_image: np.ndarray, heights: np.ndarray,
           widths: np.ndarray) -> RleLabelling:
        """From strings as `arrow_strings` or `python_strings` give them."""
        data, offsets = strings
        if not data.flags.writeable:  # the compiled kernels take writable arrays
            data = data.copy()
        return cls(np.asarray(data, np.uint8), np.asarray(offsets, np.int64),
                   *(np.asarray(a, np.int64) for a in (segment_image, heights, widths)))

    def check(self) -> Runs:
        """Each segment's area and total (no runs kept); `RleError` names the first malformed string,
        `RleSizeError` the first whose runs do not cover its image. The sweeps check as they decode; this
        says what is wrong once one has failed."""
        runs = decode_counts(self.data, self.offsets, keep_runs=False)
        sizes = (self.heights * self.widths)[self.segment_image]
        bad = np.flatnonzero(runs.totals != sizes)
        if len(bad):
            k = int(bad[0])
            raise RleSizeError(k, f"the RLE covers {runs.totals[k]} pixels, the image has {sizes[k]}")
        return runs

    def labelling(self) -> Labelling:
        """All the intervals at once, to sweep against a labelling from id maps; `OverlapError` names the
        first image where two segments share a pixel, `RleError` the first bad string."""
        start, end, label, counts, failed, code = _label_rle(self.data, self.offsets, self.segment_image,
                                                            self.heights, self.widths)
        if failed >= 0:
            raise _failure(self, failed, code)
        offsets = np.zeros(len(self.heights) + 1, np.int64)
        np.cumsum(counts, out=offsets[1:])
        return Labelling(start, end, label, offsets)


@numba.njit(cache=True, nogil=True)
def _rle_image(data, offsets, first, last, height, width, scratch, bucket, start, end, label):
    """Segments first..last-1 of one image as labelled intervals ordered by start, written to start, end and
    label: decoded into `scratch` with each interval's column, then placed column by column (a counting
    sort) and put in order within each column by insertion (a column holds few intervals). Returns how
    many there are; -1 for a string `RleLabelling.check` refuses, -2 where two segments overlap."""
    size = height * width
    inverse = 1.0 / height if height > 0 else 0.0  # an image of no pixels takes no interval
    bucket[:width + 1] = 0
    n = 0
    for s in range(first, last):
        position, stop = offsets[s], offsets[s + 1]
        pixel, run, previous, before = 0, 0, 0, 0
        while position < stop:
            value, position, failure = _number(data, position, stop)
            if run > 2:
                value += before
            if failure or value < 0 or value > size - pixel:
                return -1
            if run & 1 and value:
                column = np.int64(pixel * inverse)  # pixel // height without a division: exact below 2^52
                column -= column * height > pixel
                column += (column + 1) * height <= pixel
                scratch[0, n], scratch[1, n], scratch[2, n], scratch[3, n] = pixel, pixel + value, s, column
                bucket[column + 1] += 1
                n += 1
            pixel += value
            before, previous = previous, value
            run += 1
        if pixel != size:
            return -1
    for column in range(width):
        bucket[column + 1] += bucket[column]
    for i in range(n):
        slot = bucket[scratch[3, i]]
        bucket[scratch[3, i]] += 1
        start[slot], end[slot], label[slot] = scratch[0, i], scratch[1, i], scratch[2, i]
    for i in range(1, n):
        j = i
        while j > 0 and start[j - 1] > start[j]:
            start[j - 1], start[j] = start[j], start[j - 1]
            end[j - 1], end[j] = end[j], end[j - 1]
            label[j - 1], label[j] = label[j], label[j - 1]
            j -= 1
        if start[i] < end[i - 1]:
            return -2
    return n


@numba.njit(cache=True, nogil=True)
def _image_firsts(segment_image, n_images):
    """Each image's first segment, and one past the last image's last."""
    return np.searchsorted(segment_image, np.arange(n_images + 1))


@numba.njit(cache=True, nogil=True)
def _scratch(offsets, firsts, widths):
    """Room for the intervals of any one image (a run takes a character at least, an interval two runs) and
    the column counts of the widest."""
    most = 1
    for image in range(len(firsts) - 1):
        most = max(most, offsets[firsts[image + 1]] - offsets[firsts[image]])
    return np.empty((4, most // 2 + 1), np.int64), np.empty(widths.max() + 2 if len(widths) else 2, np.int64)


@numba.njit("Tuple((i8[:], i8[:], i8[:], i8[:], i8, i8))(u1[:], i8[:], i8[:], i8[:], i8[:])", cache=True, nogil=True)
def _label_rle(data, offsets, segment_image, heights, widths):
    n_images = len(heights)
    firsts = _image_firsts(segment_image, n_images)
    scratch, bucket = _scratch(offsets, firsts, widths)
    bound = len(data) // 2 + 1
    start, end, label = np.empty(bound, np.int64), np.empty(bound, np.int64), np.empty(bound, np.int64)
    counts = np.zeros(n_images, np.int64)
    k = 0
    for image in range(n_images):
        n = _rle_image(data, offsets, firsts[image], firsts[image + 1], heights[image], widths[image], scratch, bucket,
                       start[k:], end[k:], label[k:])
        if n < 0:
            return start[:k], end[:k], label[:k], counts, image, n
        counts[image] = n
        k += n
    return start[:k], end[:k], label[:k], counts, -1, 0


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
    def of(cls, gt: Labelling | RleLabelling, pred: Labelling | RleLabelling) -> Overlaps:
        """Sweep each image's two sides together: O(intervals), no pixel is visited. `OverlapError` (with its
        side, "gt" or "pred") names the first image where two segments of an RLE side share a pixel."""
        if isinstance(gt, RleLabelling) and isinstance(pred, RleLabelling):  # the tables' path: nothing materialised
            image, g, p, pixels, failed, side, code = _sweep_rle(
                gt.data, gt.offsets, gt.segment_image, gt.heights, gt.widths,
                pred.data, pred.offsets, pred.segment_image, pred.heights, pred.widths)
            if failed >= 0:
                raise _failure((gt, pred)[side], failed, code, ("gt", "pred")[side])
            return cls(image, g, p, pixels)
        gt, pred = _intervals(gt, "gt"), _intervals(pred, "pred")
        return cls(*_sweep(gt.start, gt.end, gt.label, gt.offsets, pred.start, pred.end, pred.label, pred.offsets))


def _failure(labelling: RleLabelling, image: int, code: int, side: str = "") -> ValueError:
    """The error a sweep's failure at `image` stands for: an overlap, or the first bad string `check` names."""
    if code == -2:
        return OverlapError(int(image), side)
    try:
        labelling.check()
    except RleError as error:
        error.side = side
        return error
    raise AssertionError(f"image position {image}: the sweep refused a string the check accepts")


def _intervals(side: Labelling | RleLabelling, name: str) -> Labelling:
    if isinstance(side, Labelling):
        return side
    try:
        return side.labelling()
    except OverlapError as error:
        raise OverlapError(error.image, name) from None
    except RleError as error:
        error.side = name
        raise


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


@numba.njit(cache=True, nogil=True)
def _sweep_image(image, g_start, g_end, g_label, p_start, p_end, p_label, out, k):
    """One image's rows (image, gt, pred, pixels) appended to `out` from row k; returns `out` (grown if
    needed) and the next free row."""
    # Rows and columns of the image's table: 0 UNLISTED, 1 VOID, 2 + k the k-th segment from the first.
    g_first, g_last = _label_range(g_label)
    p_first, p_last = _label_range(p_label)
    rows, columns = g_last - g_first + 3, p_last - p_first + 3
    table = np.zeros(rows * columns, np.int64)
    i_end, j_end = len(g_start), len(p_start)
    if i_end and j_end:  # both lists are sorted and disjoint: a two-pointer walk, the current pair in registers
        i = j = 0
        g_low, g_high, g_row = g_start[0], g_end[0], _slot(g_label[0], g_first) * columns
        p_low, p_high, p_column = p_start[0], p_end[0], _slot(p_label[0], p_first)
        while True:
            low = max(g_low, p_low)
            if g_high <= p_high:
                if low < g_high:
                    table[g_row + p_column] += g_high - low
                i += 1
                if i == i_end:
                    break
                g_low, g_high, g_row = g_start[i], g_end[i], _slot(g_label[i], g_first) * columns
            else:
                if low < p_high:
                    table[g_row + p_column] += p_high - low
                j += 1
                if j == j_end:
                    break
                p_low, p_high, p_column = p_start[j], p_end[j], _slot(p_label[j], p_first)
    # What a segment has beyond its overlaps with the other side's segments lies on that side's VOID.
    for i in range(i_end):
        table[_slot(g_label[i], g_first) * columns + 1] += g_end[i] - g_start[i]
    for j in range(j_end):
        table[columns + _slot(p_label[j], p_first)] += p_end[j] - p_start[j]
    for r in range(rows):
        for c in range(columns):
            if r != 1 and c != 1:
                table[r * columns + 1] -= table[r * columns + c]
                table[columns + c] -= table[r * columns + c]
    if k + len(table) > out.shape[1]:
        grown = np.empty((4, 2 * (k + len(table))), np.int64)
        grown[:, :k] = out[:, :k]
        out = grown
    for r in range(rows):
        for c in range(columns):
            if table[r * columns + c]:
                out[0, k], out[1, k], out[2, k] = image, _unslot(r, g_first), _unslot(c, p_first)
                out[3, k] = table[r * columns + c]
                k += 1
    return out, k


@numba.njit("UniTuple(i8[:], 4)(i8[:], i8[:], i8[:], i8[:], i8[:], i8[:], i8[:], i8[:])", cache=True, nogil=True)
def _sweep(g_start, g_end, g_label, g_offsets, p_start, p_end, p_label, p_offsets):
    out = np.empty((4, 1024), np.int64)
    k = 0
    for image in range(len(g_offsets) - 1):
        i0, i1, j0, j1 = g_offsets[image], g_offsets[image + 1], p_offsets[image], p_offsets[image + 1]
        out, k = _sweep_image(image, g_start[i0:i1], g_end[i0:i1], g_label[i0:i1], p_start[j0:j1], p_end[j0:j1],
                              p_label[j0:j1], out, k)
    return out[0, :k].copy(), out[1, :k].copy(), out[2, :k].copy(), out[3, :k].copy()


@numba.njit("Tuple((i8[:], i8[:], i8[:], i8[:], i8, i8, i8))(u1[:], i8[:], i8[:], i8[:], i8[:], u1[:], i8[:], i8[:], "
            "i8[:], i8[:])", cache=True, nogil=True)
def _sweep_rle(g_data, g_offsets, g_image, g_heights, g_widths, p_data, p_offsets, p_image, p_heights, p_widths):
    """`_sweep` of two RLE sides, each image decoded into scratch just before its sweep; also the first image
    that fails (or -1), its side (0 gt, 1 pred) and `_rle_image`'s code."""
    n_images = len(g_heights)
    g_firsts, p_firsts = _image_firsts(g_image, n_images), _image_firsts(p_image, n_images)
    g_scratch, g_bucket = _scratch(g_offsets, g_firsts, g_widths)
    p_scratch, p_bucket = _scratch(p_offsets, p_firsts, p_widths)
    g_sorted, p_sorted = np.empty((3, g_scratch.shape[1]), np.int64), np.empty((3, p_scratch.shape[1]), np.int64)
    out = np.empty((4, 1024), np.int64)
    k = 0
    for image in range(n_images):
        n = _rle_image(g_data, g_offsets, g_firsts[image], g_firsts[image + 1], g_heights[image], g_widths[image],
                       g_scratch, g_bucket, g_sorted[0], g_sorted[1], g_sorted[2])
        if n < 0:
            return out[0, :k].copy(), out[1, :k].copy(), out[2, :k].copy(), out[3, :k].copy(), image, 0, n
        m = _rle_image(p_data, p_offsets, p_firsts[image], p_firsts[image + 1], p_heights[image], p_widths[image],
                       p_scratch, p_bucket, p_sorted[0], p_sorted[1], p_sorted[2])
        if m < 0:
            return out[0, :k].copy(), out[1, :k].copy(), out[2, :k].copy(), out[3, :k].copy(), image, 1, m
        out, k = _sweep_image(image, g_sorted[0, :n], g_sorted[1, :n], g_sorted[2, :n], p_sorted[0, :m],
                              p_sorted[1, :m], p_sorted[2, :m], out, k)
    return out[0, :k].copy(), out[1, :k].copy(), out[2, :k].copy(), out[3, :k].copy(), -1, -1, 0


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
