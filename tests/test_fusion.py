"""Panoptic fusion: score order, overlap suppression, things over stuff, small stuff to VOID."""

import numpy as np
import pytest

from pipeline.fusion import FusionConfig, fuse

SKY, GRASS, PERSON, CAR = 187, 193, 1, 3


def _box(top, left, bottom, right, shape=(20, 20)):
    mask = np.zeros(shape, np.float32)
    mask[top:bottom, left:right] = 0.9
    return mask


def _semantic():
    semantic = np.full((20, 20), SKY)
    semantic[10:] = GRASS
    return semantic


def _segments(prediction):
    return [(s.category_id, s.area) for s in prediction.segments]


def test_things_are_placed_by_score_and_win_over_stuff():
    masks = np.stack([_box(0, 0, 10, 10), _box(5, 5, 15, 15)])  # the second overlaps the first by 25 px
    fused = fuse(1, "a.jpg", masks, np.array([0.7, 0.9]), np.array([PERSON, CAR]), _semantic(), {SKY, GRASS},
                 FusionConfig(stuff_area_threshold=10))
    # CAR (0.9) first: 100 px, half on sky, half on grass; PERSON keeps its 75 free px; stuff fills the rest.
    assert _segments(fused) == [(CAR, 100), (PERSON, 75), (SKY, 200 - 75 - 50), (GRASS, 200 - 50)]
    ids, info = fused.to_panoptic()
    assert (ids > 0).all() and [s["id"] for s in info] == [1, 2, 3, 4]


def test_mostly_covered_instances_and_low_scores_are_dropped():
    masks = np.stack([_box(0, 0, 10, 10), _box(0, 0, 10, 8), _box(12, 12, 18, 18)])
    fused = fuse(1, "a.jpg", masks, np.array([0.9, 0.8, 0.3]), np.array([CAR, PERSON, PERSON]), _semantic(),
                 {SKY, GRASS}, FusionConfig(stuff_area_threshold=10))
    assert [c for c, _ in _segments(fused)] == [CAR, SKY, GRASS]  # 2nd: 100% covered; 3rd: score 0.3
    lenient = fuse(1, "a.jpg", masks, np.array([0.9, 0.8, 0.3]), np.array([CAR, PERSON, PERSON]), _semantic(),
                   {SKY, GRASS}, FusionConfig(score_threshold=0.2, stuff_area_threshold=10))
    assert (PERSON, 36) in _segments(lenient)


def test_small_stuff_regions_and_unknown_labels_become_void():
    semantic = _semantic()
    semantic[0:2, 0:2] = 255  # a label that is not stuff (e.g. a "things" class of the semantic head)
    fused = fuse(1, "a.jpg", np.zeros((0, 20, 20), np.float32), np.zeros(0), np.zeros(0, int), semantic,
                 {SKY, GRASS}, FusionConfig(stuff_area_threshold=197))
    assert _segments(fused) == [(GRASS, 200)]  # sky has 196 px: under the threshold
    ids, _ = fused.to_panoptic()
    assert (ids[:10] == 0).all()


def test_mask_size_must_match_the_semantic_map():
    with pytest.raises(ValueError, match="instance masks are"):
        fuse(1, "a.jpg", np.zeros((1, 5, 5)), np.ones(1), np.ones(1, int), _semantic(), {SKY})
