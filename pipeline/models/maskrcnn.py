"""torchvision Mask R-CNN (resnet50 FPN, v1 and v2) as an instance model emitting COCO's 91-index ids."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from torchvision.models.detection import maskrcnn_resnet50_fpn, maskrcnn_resnet50_fpn_v2

from pipeline.categories import category_by_id
from pipeline.models.base import Model, ModelSettings, build_module, to_tensors
from pipeline.structures import ImagePrediction, Segment

COCO_THING_IDS = [i for i in range(1, 91) if i not in (12, 26, 29, 30, 45, 66, 68, 69, 71, 83)]


def pack_masks(masks: torch.Tensor) -> np.ndarray:
    """N x H x W booleans as bits (8x smaller to move between processes); `unpack_masks` inverts it."""
    return np.packbits(masks.cpu().numpy(), axis=-1)


def unpack_masks(packed: np.ndarray, width: int) -> np.ndarray:
    return np.unpackbits(packed, axis=-1, count=width).astype(bool)


def detections(out: dict[str, torch.Tensor], settings: ModelSettings, valid: torch.Tensor, height: int,
               width: int, mask_threshold: float) -> dict[str, Any]:
    """One image's torchvision detections above the score threshold, masks thresholded and packed.
    The 10 "N/A" slots of torchvision's 91-index are no COCO category: never emitted."""
    keep = (out["scores"] >= settings.score_threshold) & torch.isin(out["labels"], valid)
    return {"masks": pack_masks(out["masks"][keep, 0] > mask_threshold),
            "scores": out["scores"][keep].cpu().double().numpy(),
            "labels": out["labels"][keep].cpu().numpy(), "height": height, "width": width}


@dataclass(frozen=True)
class InstancePostprocess:
    """Packed masks to segments with COCO RLE, in the model's score order."""

    def __call__(self, raw: dict[str, Any], image_id: int, file_name: str) -> ImagePrediction:
        masks = unpack_masks(raw["masks"], raw["width"])
        segments = tuple(Segment.from_mask(k + 1, int(label), mask, score=float(score))
                         for k, (mask, score, label) in enumerate(zip(masks, raw["scores"], raw["labels"])))
        return ImagePrediction(image_id, file_name, raw["height"], raw["width"], segments)


class MaskRCNN(Model):
    """A torchvision Mask R-CNN; its labels are COCO category ids (the 91-index, 80 used)."""

    panoptic = False

    def __init__(self, name: str, module: torch.nn.Module, settings: ModelSettings) -> None:
        self.name = name
        by_id = category_by_id()
        self.categories = [{k: by_id[i][k] for k in ("id", "name", "supercategory", "isthing")} for i in COCO_THING_IDS]
        self.settings = settings
        self.postprocess = InstancePostprocess()
        self.module = module.to(settings.device).eval()
        self._valid = torch.tensor(COCO_THING_IDS, device=settings.device)

    @torch.inference_mode()
    def forward(self, images: list[np.ndarray]) -> list[dict[str, Any]]:
        outputs = self.module(to_tensors(images, self.settings.device))
        return [detections(out, self.settings, self._valid, *image.shape[:2], self.settings.mask_threshold)
                for image, out in zip(images, outputs)]


def _build(name: str, builder, settings: ModelSettings) -> MaskRCNN:
    # weights_backbone=None: torchvision would otherwise download ImageNet weights.
    module = build_module(lambda: builder(weights=None, weights_backbone=None, num_classes=91,
                                          min_size=settings.min_size, max_size=settings.max_size), settings, name)
    return MaskRCNN(name, module, settings)


def build_maskrcnn(settings: ModelSettings) -> MaskRCNN:
    return _build("maskrcnn_resnet50_fpn", maskrcnn_resnet50_fpn, settings)


def build_maskrcnn_v2(settings: ModelSettings) -> MaskRCNN:
    return _build("maskrcnn_resnet50_fpn_v2", maskrcnn_resnet50_fpn_v2, settings)
