"""A panoptic model the Panoptic FPN way: Mask R-CNN for things, a DeepLabV3 head for stuff, fused."""

from __future__ import annotations

from typing import Any

import numpy as np
import torch
from torchvision.models.detection import maskrcnn_resnet50_fpn
from torchvision.models.segmentation import deeplabv3_resnet50

from pipeline.models.base import PANOPTIC, Model, ModelSettings, build_module, to_tensors
from pipeline.models.maskrcnn import detections
from pipeline.models.outputs import COCO_THING_IDS, STUFF_IDS, FusionPostprocess, pack_masks, panoptic_categories
from pipeline.signals import soft_cuts

# Semantic classes: 0 = "some thing" (left to the instance branch), then COCO's 53 stuff categories.


class PanopticModel(Model):
    """Instances from Mask R-CNN, stuff from a semantic head, merged by `pipeline.fusion.fuse`.

    The weights are one state dict with `instance.*` and `semantic.*` keys (a torch.nn.ModuleDict).
    """

    kind = PANOPTIC
    name = "panoptic_maskrcnn_deeplabv3"

    def __init__(self, settings: ModelSettings) -> None:
        self.settings = settings
        self.categories = panoptic_categories()
        self.postprocess = FusionPostprocess(settings.fusion)
        # weights_backbone=None everywhere: torchvision would otherwise download ImageNet weights.
        self.module = build_module(lambda: torch.nn.ModuleDict({
            "instance": maskrcnn_resnet50_fpn(weights=None, weights_backbone=None, num_classes=91,
                                              min_size=settings.min_size, max_size=settings.max_size),
            "semantic": deeplabv3_resnet50(weights=None, weights_backbone=None, num_classes=len(STUFF_IDS) + 1,
                                           aux_loss=False),
        }), settings, self.name)
        self.module.to(settings.device).eval()
        self._valid = torch.tensor(COCO_THING_IDS, device=settings.device)
        # ImageNet normalisation, which the semantic head expects (Mask R-CNN normalises inside).
        self._mean = torch.tensor([0.485, 0.456, 0.406], device=settings.device)[:, None, None]
        self._std = torch.tensor([0.229, 0.224, 0.225], device=settings.device)[:, None, None]

    @torch.inference_mode()
    def forward(self, images: list[np.ndarray]) -> list[dict[str, Any]]:
        tensors = to_tensors(images, self.settings.device)
        raws = []
        for tensor, out in zip(tensors, self.module["instance"](tensors)):
            logits = self.module["semantic"](((tensor - self._mean) / self._std)[None])["out"][0]
            raw = detections(out, self.settings, self._valid, *tensor.shape[1:], self.settings.fusion.mask_threshold)
            top = logits.max(dim=0)
            raw["semantic"] = top.indices.to(torch.uint8).cpu().numpy()
            probability = torch.exp(top.values - torch.logsumexp(logits, 0)).cpu().numpy()
            raw["cuts"] = pack_masks(soft_cuts(probability))  # for the stuff segments' stability
            raws.append(raw)
        return raws

    @classmethod
    def build(cls, name: str, settings: ModelSettings) -> PanopticModel:
        return cls(settings)

    @classmethod
    def describe(cls, name: str, settings: ModelSettings) -> list[dict]:
        return panoptic_categories()
