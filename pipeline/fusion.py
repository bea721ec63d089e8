"""Panoptic fusion: instance masks and a semantic map merged the Panoptic FPN way into one panoptic map."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from pipeline.structures import ImagePrediction


@dataclass(frozen=True)
class FusionConfig:
    """The thresholds of the Panoptic FPN merge heuristic (Kirillov et al., 2019)."""

    score_threshold: float = 0.5
    """Instances scoring below this are dropped."""
    mask_threshold: float = 0.5
    """A pixel belongs to an instance when its mask probability exceeds this."""
    overlap_threshold: float = 0.5
    """An instance whose mask lies more than this fraction on higher-scoring instances is dropped;
    otherwise it keeps the pixels not already taken."""
    stuff_area_threshold: int = 4096
    """Stuff regions smaller than this (after things took their pixels) become VOID."""


def fuse(image_id: int, file_name: str, masks: np.ndarray, scores: np.ndarray, labels: np.ndarray,
         semantic: np.ndarray, stuff_ids: set[int], config: FusionConfig = FusionConfig()) -> ImagePrediction:
    """`fuse_panoptic` as an ImagePrediction (segments measured from the id map)."""
    return ImagePrediction.from_panoptic(image_id, file_name,
                                         *fuse_panoptic(masks, scores, labels, semantic, stuff_ids, config))


def fuse_panoptic(masks: np.ndarray, scores: np.ndarray, labels: np.ndarray, semantic: np.ndarray,
                  stuff_ids: set[int], config: FusionConfig = FusionConfig(),
                  stability: np.ndarray | None = None) -> tuple[np.ndarray, list[dict]]:
    """Merge instances (masks N x H x W, probabilities or booleans; scores; thing category ids) and a
    semantic map (H x W category ids) into non-overlapping segments. Things win over stuff: they are
    placed first, by score; stuff fills what is left. Only semantic ids in `stuff_ids` become stuff.
    A thing keeps its instance's `stability` where one is given."""
    height, width = semantic.shape
    if masks.shape[1:] != (height, width) and len(masks):
        raise ValueError(f"instance masks are {masks.shape[1:]}, the semantic map is {semantic.shape}")
    ids = np.zeros((height, width), np.uint32)
    segments: list[dict] = []
    for k in np.argsort(-np.asarray(scores, np.float64), kind="stable").tolist():
        if scores[k] < config.score_threshold:
            break
        mask = masks[k] > config.mask_threshold if masks.dtype != bool else masks[k]
        area = int(mask.sum())
        if area == 0:
            continue
        free = mask & (ids == 0)
        if (area - int(free.sum())) / area > config.overlap_threshold:
            continue
        if not free.any():
            continue
        segment_id = len(segments) + 1
        ids[free] = segment_id
        segments.append({"id": segment_id, "category_id": int(labels[k]), "iscrowd": 0, "score": float(scores[k])}
                        | ({"stability": float(stability[k])} if stability is not None else {}))
    unclaimed = ids == 0
    for category_id in np.unique(semantic[unclaimed]).tolist():
        if category_id not in stuff_ids:
            continue
        region = unclaimed & (semantic == category_id)
        if int(region.sum()) < config.stuff_area_threshold:
            continue
        segment_id = len(segments) + 1
        ids[region] = segment_id
        segments.append({"id": segment_id, "category_id": int(category_id), "iscrowd": 0, "score": 1.0})
    return ids, segments
