"""torchvision Mask R-CNN (resnet50 FPN, v1 and v2) as an instance model emitting COCO's 91-index ids."""

from __future__ import annotations

from typing import Any

import numpy as np
import torch
from torchvision.models.detection import maskrcnn_resnet50_fpn, maskrcnn_resnet50_fpn_v2

from pipeline.models.base import INSTANCE, Model, ModelSettings, build_module, to_tensors
from pipeline.models.outputs import COCO_THING_IDS, InstancePostprocess, pack_masks, thing_categories
from pipeline.signals import mask_stability


def detections(out: dict[str, torch.Tensor], settings: ModelSettings, valid: torch.Tensor, height: int,
               width: int, mask_threshold: float) -> dict[str, Any]:
    """One image's torchvision detections above the score threshold, masks thresholded and packed.
    The 10 "N/A" slots of torchvision's 91-index are no COCO category: never emitted."""
    keep = (out["scores"] >= settings.score_threshold) & torch.isin(out["labels"], valid)
    probabilities = out["masks"][keep, 0]
    return {"masks": pack_masks((probabilities > mask_threshold).cpu().numpy()),
            "scores": out["scores"][keep].cpu().double().numpy(),
            "labels": out["labels"][keep].cpu().numpy(), "height": height, "width": width,
            "stability": mask_stability(probabilities, mask_threshold)}


class MaskRCNN(Model):
    """A torchvision Mask R-CNN; its labels are COCO category ids (the 91-index, 80 used)."""

    kind = INSTANCE
    objective = "pipeline.train.objectives:MaskRCNNObjective"
    BUILDERS = {"maskrcnn_resnet50_fpn": maskrcnn_resnet50_fpn, "maskrcnn_resnet50_fpn_v2": maskrcnn_resnet50_fpn_v2}

    def __init__(self, name: str, module: torch.nn.Module, settings: ModelSettings) -> None:
        self.name = name
        self.categories = thing_categories()
        self.settings = settings
        self.postprocess = InstancePostprocess()
        self.module = module.to(settings.device).eval()
        self._valid = torch.tensor(COCO_THING_IDS, device=settings.device)

    @torch.inference_mode()
    def forward(self, images: list[np.ndarray]) -> list[dict[str, Any]]:
        outputs = self.module(to_tensors(images, self.settings.device))
        return [detections(out, self.settings, self._valid, *image.shape[:2], self.settings.mask_threshold)
                for image, out in zip(images, outputs)]

    @classmethod
    def build(cls, name: str, settings: ModelSettings) -> MaskRCNN:
        # weights_backbone=None: torchvision would otherwise download ImageNet weights.
        module = build_module(lambda: cls.BUILDERS[name](weights=None, weights_backbone=None, num_classes=91,
                                                         min_size=settings.min_size, max_size=settings.max_size),
                              settings, name)
        return cls(name, module, settings)

    @classmethod
    def describe(cls, name: str, settings: ModelSettings) -> list[dict]:
        return thing_categories()
