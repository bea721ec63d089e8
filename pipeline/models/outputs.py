"""What model actors hand to post-processing, and how it becomes segments: numpy only, so the CPU tasks
that run it never import torch (which costs seconds per worker process)."""

from __future__ import annotations

from abc import ABC, abstractmethod
from dataclasses import dataclass, replace
from typing import Any, Protocol

import numpy as np

from pipeline.categories import category_by_id, coco_panoptic_categories
from pipeline.fusion import FusionConfig, fuse_panoptic
from pipeline.signals import region_stability
from pipeline.structures import ImagePrediction, Rle, Segment

COCO_THING_IDS = [i for i in range(1, 91) if i not in (12, 26, 29, 30, 45, 66, 68, 69, 71, 83)]
"""torchvision's detection labels that are COCO categories (its 91-index has 10 "N/A" slots)."""
STUFF_IDS = [c["id"] for c in coco_panoptic_categories() if not c["isthing"]]
"""COCO's 53 stuff categories."""
STRIDE = 4
"""segpipe_small's output resolution: one centre and offset per 4 x 4 pixels."""


def _described(category: dict) -> dict:
    return {k: category[k] for k in ("id", "name", "supercategory", "isthing")}


def thing_categories() -> list[dict]:
    """COCO's 80 thing categories, as the panoptic categories file describes them."""
    by_id = category_by_id()
    return [_described(by_id[i]) for i in COCO_THING_IDS]


def panoptic_categories() -> list[dict]:
    return [_described(c) for c in coco_panoptic_categories()]


def pack_masks(masks: np.ndarray) -> np.ndarray:
    """N x H x W booleans as bits (8x smaller to move between processes); `unpack_masks` inverts it."""
    return np.packbits(masks, axis=-1)


def unpack_masks(packed: np.ndarray, width: int) -> np.ndarray:
    return np.unpackbits(packed, axis=-1, count=width).astype(bool)


def with_region_stability(ids: np.ndarray, segments: list[dict], raw: dict[str, Any],
                          only: set[int] | None = None) -> list[dict]:
    """`segments` with the stability of each (of those whose id is in `only`, if given) from the raw output's
    packed `cuts` of its class probabilities (pipeline.signals); unchanged when the model gave none."""
    if "cuts" not in raw:
        return segments
    chosen = [s["id"] for s in segments if only is None or s["id"] in only]
    found = dict(zip(chosen, region_stability(ids, chosen, unpack_masks(raw["cuts"], ids.shape[1]))))
    return [{**s, "stability": found[s["id"]]} if s["id"] in found else s for s in segments]


class Postprocess(Protocol):
    """Turns one image's raw model output into segments. Small and picklable: it runs on CPU tasks,
    away from the model actors, so masks are encoded while the accelerator works on the next batch."""

    def __call__(self, raw: dict[str, Any], image_id: int, file_name: str) -> ImagePrediction: ...


class PanopticPostprocess(ABC):
    """Postprocess of a panoptic model: the id map first (the PNG is written from it), segments from it."""

    @abstractmethod
    def panoptic(self, raw: dict[str, Any]) -> tuple[np.ndarray, list[dict]]:
        """The H x W uint32 id map (0 = VOID) and its segments (id, category_id, iscrowd, score)."""

    def __call__(self, raw: dict[str, Any], image_id: int, file_name: str) -> ImagePrediction:
        return ImagePrediction.from_panoptic(image_id, file_name, *self.panoptic(raw))


@dataclass(frozen=True)
class InstancePostprocess:
    """Packed masks (with scores and labels) to segments with COCO RLE, in the model's score order."""

    def __call__(self, raw: dict[str, Any], image_id: int, file_name: str) -> ImagePrediction:
        masks = unpack_masks(raw["masks"], raw["width"])
        stability = raw.get("stability", [None] * len(masks))
        segments = tuple(Segment.from_mask(k + 1, int(label), mask, score=float(score),
                                           stability=None if stable is None else float(stable))
                         for k, (mask, score, label, stable) in enumerate(zip(masks, raw["scores"], raw["labels"],
                                                                              stability)))
        return ImagePrediction(image_id, file_name, raw["height"], raw["width"], segments)


OBJECT = {"id": 1, "name": "object", "supercategory": "object", "isthing": 1}
"""The one category of class-agnostic proposals (SA-1B style)."""


class ProposalPostprocess:
    """Class-agnostic proposals (COCO RLE from the generator, its predicted IoU as the score, its stability
    score, the point prompt and the crop) to segments of category OBJECT, in the generator's order."""

    def __call__(self, raw: dict[str, Any], image_id: int, file_name: str) -> ImagePrediction:
        height, width = raw["height"], raw["width"]
        segments = tuple(
            replace(Segment.from_rle(k + 1, OBJECT["id"], Rle(counts, height, width), score=float(score),
                                     stability=float(stable)),
                    point_coords=tuple((float(x), float(y)) for x, y in points), crop_box=tuple(map(float, crop)))
            for k, (counts, score, stable, points, crop) in enumerate(zip(
                raw["rles"], raw["scores"], raw["stability"], raw["points"], raw["crop_boxes"])))
        return ImagePrediction(image_id, file_name, height, width, segments)


@dataclass(frozen=True)
class FusionPostprocess(PanopticPostprocess):
    """Detections and a semantic map (indices into [0, *STUFF_IDS]) merged by `pipeline.fusion`."""

    config: FusionConfig

    def panoptic(self, raw: dict[str, Any]) -> tuple[np.ndarray, list[dict]]:
        semantic = np.asarray([0, *STUFF_IDS], np.int64)[raw["semantic"]]
        ids, segments = fuse_panoptic(unpack_masks(raw["masks"], raw["width"]), raw["scores"], raw["labels"],
                                      semantic, set(STUFF_IDS), self.config, raw.get("stability"))
        return ids, with_region_stability(ids, segments, raw, {s["id"] for s in segments if "stability" not in s})


@dataclass(frozen=True)
class BottomUpPostprocess(PanopticPostprocess):
    """Panoptic-DeepLab grouping: centres are local maxima of the heatmap, each thing pixel joins the
    centre its offset points nearest to, an instance's category is its pixels' majority; stuff is the
    semantic map where no thing is, regions under `stuff_area` pixels become VOID."""

    category_ids: tuple[int, ...]
    isthing: tuple[bool, ...]
    centre_threshold: float = 0.1
    nms_kernel: int = 7
    top_k: int = 64
    min_thing_area: int = 8
    stuff_area: int = 64

    def panoptic(self, raw: dict[str, Any]) -> tuple[np.ndarray, list[dict]]:
        semantic = raw["semantic"].astype(np.int64)  # H x W indices into category_ids
        height, width = semantic.shape
        ids = np.zeros((height, width), np.uint32)
        segments: list[dict] = []
        thing = np.asarray(self.isthing)[semantic]
        centres, scores = self._centres(raw["centre"].astype(np.float32))
        if len(centres) and thing.any():
            # Each 1/STRIDE cell points (its centre plus its offset) somewhere; it joins the nearest centre,
            # by |p - c|^2 = |p|^2 - 2 p.c + |c|^2 (the first term is the same for every c); pixels take
            # their cell's choice, as Panoptic-DeepLab groups at its output resolution.
            offset = raw["offset"].astype(np.float32)  # 2 x h x w at 1/STRIDE, in input pixels
            cy, cx = np.indices(offset.shape[1:], dtype=np.float32) * STRIDE + (STRIDE - 1) / 2
            pointed = np.stack([(cy + offset[0]).ravel(), (cx + offset[1]).ravel()], axis=1)
            cells = ((centres ** 2).sum(1)[None, :] - 2 * pointed @ centres.T).argmin(1).reshape(offset.shape[1:])
            ys, xs = np.nonzero(thing)
            nearest = cells[ys // STRIDE, xs // STRIDE]
            k_count = len(centres)
            sizes = np.bincount(nearest, minlength=k_count)
            votes = np.bincount(nearest * len(self.category_ids) + semantic[ys, xs],
                                minlength=k_count * len(self.category_ids)).reshape(k_count, -1)
            segment_of = np.zeros(k_count, np.uint32)
            for k in np.flatnonzero(sizes >= self.min_thing_area).tolist():
                segments.append({"id": len(segments) + 1, "category_id": self.category_ids[int(votes[k].argmax())],
                                 "iscrowd": 0, "score": float(np.clip(scores[k], 0.0, 1.0))})
                segment_of[k] = len(segments)
            ids[ys, xs] = segment_of[nearest]
        free = ids == 0
        for index in np.unique(semantic[free & ~thing]).tolist():
            region = free & (semantic == index)
            if region.sum() >= self.stuff_area:
                segments.append({"id": len(segments) + 1, "category_id": self.category_ids[index], "iscrowd": 0,
                                 "score": 1.0})
                ids[region] = len(segments)
        return ids, with_region_stability(ids, segments, raw)

    def _centres(self, heat: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """(K x 2 centre coordinates in input pixels, K scores): heatmap peaks above the threshold, a peak
        being the maximum of the `nms_kernel` square around it."""
        r = self.nms_kernel // 2
        padded = np.pad(heat, r, constant_values=-np.inf)
        window = np.lib.stride_tricks.sliding_window_view
        rows = window(padded, self.nms_kernel, axis=0).max(axis=-1)  # a square's maximum: rows', then columns'
        pooled = window(rows, self.nms_kernel, axis=1).max(axis=-1)
        ys, xs = np.nonzero((heat == pooled) & (heat > self.centre_threshold))
        values = heat[ys, xs]
        order = np.argsort(-values, kind="stable")[: self.top_k]
        centres = np.stack([ys[order], xs[order]], axis=1).astype(np.float32) * STRIDE + (STRIDE - 1) / 2
        return centres, values[order]


def bottom_up_targets(ids: np.ndarray, segments_info: list[dict], category_ids: tuple[int, ...],
                      isthing: tuple[bool, ...], sigma: float = 8.0) -> dict[str, np.ndarray]:
    """What `BottomUpPostprocess` decodes, made from a ground-truth panoptic map (the training targets of
    segpipe_small): `semantic` (H x W category indices, 255 = VOID), `centre` (Gaussian of `sigma` pixels
    around each non-crowd thing's centre of mass, at 1/STRIDE), `offset` (2 x h x w, cell centre to its
    thing's centre, in pixels) and `offset_weight` (1 on cells whose centre pixel is a non-crowd thing)."""
    height, width = ids.shape
    index = {c: i for i, c in enumerate(category_ids)}
    h, w = -(-height // STRIDE), -(-width // STRIDE)
    semantic = np.full((height, width), 255, np.uint8)
    centre = np.zeros((h, w), np.float32)
    offset = np.zeros((2, h, w), np.float32)
    weight = np.zeros((h, w), np.float32)
    cy, cx = np.indices((h, w), dtype=np.float32) * STRIDE + (STRIDE - 1) / 2
    cell_ids = ids[np.minimum(cy.astype(int) + 1, height - 1), np.minimum(cx.astype(int) + 1, width - 1)]
    for segment in segments_info:
        mask = ids == segment["id"]
        k = index[segment["category_id"]]
        semantic[mask] = k
        if not isthing[k] or segment.get("iscrowd"):
            continue
        ys, xs = np.nonzero(mask)
        y0, x0 = ys.mean(), xs.mean()
        np.maximum(centre, np.exp(-((cy - y0) ** 2 + (cx - x0) ** 2) / (2 * sigma ** 2)), out=centre)
        cells = cell_ids == segment["id"]
        offset[0][cells], offset[1][cells], weight[cells] = y0 - cy[cells], x0 - cx[cells], 1.0
    return {"semantic": semantic, "centre": centre, "offset": offset, "offset_weight": weight}
