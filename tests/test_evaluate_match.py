"""The matcher: RLE strings to runs, labellings from id maps and RLE strings, sweeps and pair intersections."""

import numpy as np
import pytest
from pycocotools import mask as mask_utils

from pipeline.evaluate.match import (UNLISTED, VOID, Labelling, OverlapError, Overlaps, RleError, RleLabelling,
                                     RleSizeError, decode_counts, decode_strings, measure, pair_intersections, python_strings)

SIZE = (37, 53)


def _random_map(rng, n):
    """An id map with up to n rectangles of random 24-bit ids painted over each other, and VOID around them."""
    ids = np.zeros(SIZE, np.uint32)
    chosen = rng.choice(np.arange(1, 2**24), n, replace=False)
    for sid in chosen:
        y, x = rng.integers(0, SIZE[0]), rng.integers(0, SIZE[1])
        ids[max(0, y - rng.integers(1, 20)):y + rng.integers(1, 20), max(0, x - rng.integers(1, 20)):x + rng.integers(1, 20)] = sid
    return ids, [int(s) for s in chosen if (ids == s).any()]


def _rles(ids, listed):
    return [mask_utils.encode(np.asfortranarray((ids == s).astype(np.uint8)))["counts"] for s in listed]


@pytest.fixture(scope="module")
def images():
    rng = np.random.default_rng(0)
    return [_random_map(rng, 9) for _ in range(25)], [_random_map(rng, 6) for _ in range(25)]


def _brute_force(gt_maps, gt_listed, pred_maps, pred_listed):
    """{(image, gt label, pred label): pixels} by painting label maps and counting every pixel."""
    out, g_base, p_base = {}, 0, 0
    for i, (g, gl, p, pl) in enumerate(zip(gt_maps, gt_listed, pred_maps, pred_listed)):
        g_label, p_label = np.full(SIZE, VOID), np.full(SIZE, VOID)
        g_label[g != 0] = UNLISTED
        p_label[p != 0] = UNLISTED
        for k, s in enumerate(gl):
            g_label[g == s] = g_base + k
        for k, s in enumerate(pl):
            p_label[p == s] = p_base + k
        pairs, counts = np.unique(np.stack([g_label.ravel(), p_label.ravel()]), axis=1, return_counts=True)
        out.update({(i, a, b): c for (a, b), c in zip(pairs.T.tolist(), counts.tolist()) if (a, b) != (VOID, VOID)})
        g_base, p_base = g_base + len(gl), p_base + len(pl)
    return out


def _as_dict(overlaps):
    return {(i, g, p): c for i, g, p, c in zip(overlaps.image.tolist(), overlaps.gt.tolist(),
                                                overlaps.pred.tolist(), overlaps.pixels.tolist())}


def test_overlaps_of_id_maps_count_every_pixel_pair_unlisted_ids_apart(images):
    (gt, pred) = images
    gt_maps, gt_listed = [m for m, _ in gt], [s[:-1] for _, s in gt]  # the last id of each image is unlisted
    pred_maps, pred_listed = [m for m, _ in pred], [s for _, s in pred]
    overlaps = Overlaps.of(Labelling.from_id_maps(gt_maps, gt_listed), Labelling.from_id_maps(pred_maps, pred_listed))
    expected = _brute_force(gt_maps, gt_listed, pred_maps, pred_listed)
    assert any(g == UNLISTED for _, g, _ in expected)
    assert _as_dict(overlaps) == expected
    keys = list(zip(overlaps.image.tolist(), overlaps.gt.tolist(), overlaps.pred.tolist()))
    assert keys == sorted(keys)


def _rle_side(side):
    strings, segment_image = [], []
    for i, (ids, listed) in enumerate(side):
        strings += _rles(ids, listed)
        segment_image += [i] * len(listed)
    shape = np.full(len(side), SIZE[0]), np.full(len(side), SIZE[1])
    return RleLabelling.of(python_strings(strings), np.asarray(segment_image), *shape)


def test_rle_strings_give_the_same_overlaps_as_the_id_maps_on_either_side(images):
    (gt, pred) = images
    pred = pred[:7] + [(np.zeros(SIZE, np.uint32), [])] + pred[8:]  # an image with no segments at all
    gt_rle, pred_rle = _rle_side(gt), _rle_side(pred)
    assert pred_rle.check().areas.tolist() == [int((ids == s).sum()) for ids, listed in pred for s in listed]
    gt_maps = Labelling.from_id_maps([m for m, _ in gt], [s for _, s in gt])
    pred_maps = Labelling.from_id_maps([m for m, _ in pred], [s for _, s in pred])
    from_maps = _as_dict(Overlaps.of(gt_maps, pred_maps))
    assert from_maps == _brute_force([m for m, _ in gt], [s for _, s in gt], [m for m, _ in pred], [s for _, s in pred])
    assert _as_dict(Overlaps.of(gt_maps, pred_rle)) == from_maps
    assert _as_dict(Overlaps.of(gt_rle, pred_maps)) == from_maps
    assert _as_dict(Overlaps.of(gt_rle, pred_rle)) == from_maps  # decoded image by image, nothing materialised
    materialised = pred_rle.labelling()
    assert [materialised.start.tolist(), materialised.end.tolist(), materialised.label.tolist()] == \
        [pred_maps.start.tolist(), pred_maps.end.tolist(), pred_maps.label.tolist()]


def test_decoder_equals_the_reference_on_random_masks_and_refuses_bad_strings():
    rng = np.random.default_rng(3)
    masks = [rng.random((23, 31)) < p for p in (0.0, 0.02, 0.5, 0.98, 1.0)]
    strings = [mask_utils.encode(np.asfortranarray(m.astype(np.uint8)))["counts"].decode() for m in masks]
    runs = decode_strings(strings)
    for i, mask in enumerate(masks):  # the runs, counted from the mask's column-major pixels
        flat = mask.ravel(order="F")
        change = np.flatnonzero(flat[1:] != flat[:-1]) + 1
        edges = np.concatenate(([0], change, [flat.size]))
        expected = np.diff(edges).tolist() if not flat[0] else [0, *np.diff(edges).tolist()]
        assert runs.lengths[runs.offsets[i]:runs.offsets[i + 1]].tolist() == expected
    assert runs.areas.tolist() == [int(m.sum()) for m in masks]
    checked = decode_counts(*python_strings(strings), keep_runs=False)  # a check only: no runs kept
    assert (len(checked.lengths), checked.areas.tolist(), checked.totals.tolist()) == (0, runs.areas.tolist(), [23 * 31] * 5)
    for bad, reason in (("0`", "ends inside a run"), ("0 1", "outside the RLE alphabet"), ("@", "negative")):
        with pytest.raises(RleError, match=reason) as error:
            decode_strings(["02", bad])
        assert error.value.index == 1


def test_pair_intersections_equal_decoded_masks_and_overlapping_masks_are_refused_as_a_labelling():
    rng = np.random.default_rng(5)
    masks = [rng.random(SIZE) < p for p in rng.random(12)]
    runs = decode_strings([mask_utils.encode(np.asfortranarray(m.astype(np.uint8)))["counts"] for m in masks])
    a, b = rng.integers(0, 12, 200), rng.integers(0, 12, 200)
    assert pair_intersections(runs, runs, a, b).tolist() == [int((masks[i] & masks[j]).sum()) for i, j in zip(a, b)]
    strings = python_strings([mask_utils.encode(np.asfortranarray(m.astype(np.uint8)))["counts"] for m in masks])
    images, shape = np.array([0] * 6 + [1] * 6), (np.full(2, SIZE[0]), np.full(2, SIZE[1]))
    overlapping = RleLabelling.of(strings, images, *shape)
    with pytest.raises(OverlapError) as error:
        overlapping.labelling()
    assert error.value.image == 0
    disjoint = RleLabelling.of(python_strings([]), np.zeros(0, np.int64), *shape)
    for gt, pred, side in ((disjoint, overlapping, "pred"), (overlapping, disjoint, "gt")):
        with pytest.raises(OverlapError) as error:
            Overlaps.of(gt, pred)
        assert (error.value.image, error.value.side) == (0, side)


@pytest.mark.parametrize("bad, error_type, reason", [
    ("0`", RleError, "ends inside a run"), ("0 1", RleError, "outside the RLE alphabet"), ("@", RleError, "negative"),
    ("0" + "_" * 12 + "0", RleError, "longer than 2"),
    ("1", RleSizeError, "the RLE covers 1 pixels, the image has 6"), ("07", RleSizeError, "covers 7 pixels, the image has 6"),
])
def test_a_sweep_checks_the_strings_as_it_decodes_and_names_the_first_bad_one(bad, error_type, reason):
    # Two 2x3 images; image 1's segments are runs [0, 3, 3] and [3, 3] ("33"), here replaced by `bad`.
    shape = (np.array([2, 2]), np.array([3, 3]))
    side = RleLabelling.of(python_strings(["15", "033", bad]), np.array([0, 1, 1]), *shape)
    good = RleLabelling.of(python_strings(["06", "06"]), np.array([0, 1]), *shape)
    maps = Labelling.from_id_maps([np.ones((2, 3), np.uint32)] * 2, [[1]] * 2)
    for call, name in ((lambda: Overlaps.of(good, side), "pred"), (lambda: Overlaps.of(side, good), "gt"),
                       (lambda: Overlaps.of(maps, side), "pred"), (side.labelling, ""), (side.check, "")):
        with pytest.raises(error_type, match=reason) as error:
            call()
        assert (error.value.index, error.value.side) == (2, name)
    valid = RleLabelling.of(python_strings(["15", "033", "33"]), np.array([0, 1, 1]), *shape)
    assert _as_dict(Overlaps.of(good, valid)) == {(0, 0, VOID): 1, (0, 0, 0): 5, (1, 1, 1): 3, (1, 1, 2): 3}


def test_areas_and_boxes_of_a_labelling_equal_pycocotools(images):
    (gt, _) = images
    maps, listed = [m for m, _ in gt], [s for _, s in gt]
    areas, boxes = measure(Labelling.from_id_maps(maps, listed), sum(map(len, listed)), [SIZE[0]] * len(maps))
    rles = [rle for ids, segments in gt for rle in _rles(ids, segments)]
    encoded = [{"size": list(SIZE), "counts": rle} for rle in rles]
    assert areas.tolist() == mask_utils.area(encoded).tolist()
    assert boxes.tolist() == mask_utils.toBbox(encoded).astype(int).tolist()
