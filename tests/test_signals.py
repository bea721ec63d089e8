"""Quality signals pinned on hand-made soft outputs: stability (instance masks, class maps), flip agreement, border."""

import math

from dataclasses import replace

import numpy as np
import pytest
import torch

from pipeline.fusion import FusionConfig
from pipeline.models.outputs import BottomUpPostprocess, FusionPostprocess, InstancePostprocess, pack_masks
from pipeline.signals import cuts, flip_agreement, mask_stability, region_stability, soft_cuts, touches_border
from pipeline.structures import ImagePrediction, Segment, predictions_from_arrow, predictions_to_arrow


def test_the_cuts_lie_one_logit_either_side_of_the_threshold():
    low, high = cuts(0.5)
    assert (low, high) == (pytest.approx(1 / (1 + math.e)), pytest.approx(1 / (1 + math.exp(-1))))  # 0.269, 0.731
    low, high = cuts(0.8)
    assert math.log(high / (1 - high)) - math.log(0.8 / 0.2) == pytest.approx(1.0)
    assert math.log(0.8 / 0.2) - math.log(low / (1 - low)) == pytest.approx(1.0)


def test_mask_stability_is_the_high_cut_over_the_low_cut():
    probabilities = torch.zeros(3, 4, 5)
    probabilities[0, :2] = 0.9  # 10 pixels above both cuts
    probabilities[0, 2:] = 0.5  # 10 more above the low cut only
    probabilities[1] = 0.74  # all 20 above both
    probabilities[2] = 0.2  # nothing above the low cut: an empty mask
    assert mask_stability(probabilities, 0.5).tolist() == [0.5, 1.0, 0.0]


def test_region_stability_counts_only_the_segments_own_pixels():
    ids = np.array([[1, 1, 1, 2], [1, 1, 3, 2]], np.uint32)
    probability = np.array([[0.9, 0.9, 0.5, 0.8], [0.3, 0.2, 0.1, 0.1]])
    above = soft_cuts(probability)
    # segment 1: 5 pixels, above low 0.9 0.9 0.5 0.3 (4), above high 0.9 0.9 (2); segment 2: low 1, high 1;
    # segment 3: no pixel above the low cut
    assert region_stability(ids, [1, 2, 3], above) == [0.5, 1.0, 0.0]
    assert region_stability(ids, [], above) == []


def test_bottom_up_segments_carry_their_stability():
    semantic = np.zeros((8, 8), np.uint8)  # all stuff class 0; class 1 (a thing) nowhere
    probability = np.full((8, 8), 0.9)
    probability[:, :2] = 0.5  # 16 of 64 pixels only above the low cut
    raw = {"semantic": semantic, "centre": np.zeros((2, 2), np.float16), "offset": np.zeros((2, 2, 2), np.float16),
           "cuts": pack_masks(soft_cuts(probability))}
    post = BottomUpPostprocess((5, 6), (False, True), stuff_area=1)
    ids, segments = post.panoptic(raw)
    assert [(s["category_id"], s["stability"]) for s in segments] == [(5, 48 / 64)]
    del raw["cuts"]  # an older model's output: no stability
    assert "stability" not in post.panoptic(raw)[1][0]


def test_instance_and_fused_segments_take_the_instances_stability():
    masks = np.zeros((2, 6, 6), bool)
    masks[0, :3], masks[1, 3:] = True, True
    raw = {"masks": pack_masks(masks), "scores": np.array([0.9, 0.8]), "labels": np.array([1, 2]), "height": 6,
           "width": 6, "stability": np.array([0.75, 0.5])}
    prediction = InstancePostprocess()(raw, 7, "a.jpg")
    assert [s.stability for s in prediction.segments] == [0.75, 0.5]
    # Fused: things keep their instance's stability, stuff gets its region's from the semantic cuts.
    masks[1] = False
    probability = np.full((6, 6), 0.9)
    probability[3:, :3] = 0.5
    fused = {**raw, "masks": pack_masks(masks), "semantic": np.ones((6, 6), np.uint8),
             "cuts": pack_masks(soft_cuts(probability))}
    ids, segments = FusionPostprocess(FusionConfig(stuff_area_threshold=1)).panoptic(fused)
    assert [(s["category_id"], s["stability"]) for s in segments] == [(1, 0.75), (92, 9 / 18)]  # 92: the first stuff id


def test_flip_agreement_is_the_best_same_category_iou_mirrored_back():
    def segment(id, category, mask):
        return Segment.from_mask(id, category, mask)

    left = np.zeros((4, 6), bool)
    left[:, :2] = True  # columns 0-1; mirrored: columns 4-5
    middle = np.zeros((4, 6), bool)
    middle[:, 2:4] = True  # symmetric
    prediction = ImagePrediction(1, "a", 4, 6, (segment(1, 7, left), segment(2, 7, middle), segment(3, 8, left)))
    right = left[:, ::-1].copy()
    shifted = np.zeros((4, 6), bool)
    shifted[:, 3:] = True  # mirrored back: columns 0-2, IoU with `left` 8 / 12
    flipped = ImagePrediction(1, "a", 4, 6, (segment(1, 7, right), segment(2, 7, middle), segment(3, 9, shifted)))
    assert flip_agreement(prediction, flipped) == [1.0, 1.0, 0.0]  # segment 3's category is not in `flipped`
    flipped = ImagePrediction(1, "a", 4, 6, (segment(1, 8, shifted),))
    assert flip_agreement(prediction, flipped) == [0.0, 0.0, pytest.approx(8 / 12)]
    assert flip_agreement(prediction, ImagePrediction(1, "a", 4, 6)) == [0.0, 0.0, 0.0]


def test_touches_border():
    assert touches_border((0, 3, 2, 2), 10, 10) and touches_border((3, 3, 7, 2), 10, 10)
    assert touches_border((3, 8, 2, 2), 10, 10) and not touches_border((1, 1, 8, 8), 10, 10)
    assert not touches_border((0, 0, 0, 0), 10, 10)  # an empty mask is nowhere


def test_the_signals_are_table_columns_and_a_version_1_table_reads_without_them():
    mask = np.zeros((5, 5), bool)
    mask[1:3, 1:3] = True
    edge = np.zeros((5, 5), bool)
    edge[4] = True
    inside = replace(Segment.from_mask(1, 7, mask, 0.9, stability=0.8), flip_iou=0.5)
    prediction = ImagePrediction(3, "a.jpg", 5, 5, (inside, Segment.from_mask(2, 7, edge, 0.7, stability=0.25)))
    table = predictions_to_arrow([prediction], "run", "m")
    assert table.column("touches_border").to_pylist() == [False, True]
    assert table.column("stability").to_pylist() == [0.8, 0.25]
    assert table.column("flip_iou").to_pylist() == [0.5, None]
    assert predictions_from_arrow(table) == [prediction]
    (read,) = predictions_from_arrow(table.drop_columns(["stability", "flip_iou", "touches_border"]))
    assert read == replace(prediction, segments=tuple(replace(s, stability=None, flip_iou=None)
                                                      for s in prediction.segments))
