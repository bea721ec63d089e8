"""A panoptic model the Panoptic FPN way: Mask R-CNN for things, a DeepLabV3 head for stuff, fused."""

from __future__ import annotations

import numpy as np
import torch
from torchvision.models.detection import maskrcnn_resnet50_fpn
from torchvision.models.segmentation import deeplabv3_resnet50

from pipeline.categories import coco_panoptic_categories
from pipeline.fusion import fuse
from pipeline.models.base import ModelSettings, load_state_dict, to_tensors
from pipeline.models.maskrcnn import COCO_THING_IDS
from pipeline.structures import ImagePrediction

# Semantic classes: 0 = "some thing" (left to the instance branch), then COCO's 53 stuff categories.
STUFF_IDS = [c["id"] for c in coco_panoptic_categories() if not c["isthing"]]


class PanopticModel:
    """Instances from Mask R-CNN, stuff from a semantic head, merged by `pipeline.fusion.fuse`.

    The weights are one state dict with `instance.*` and `semantic.*` keys (a torch.nn.ModuleDict).
    """

    name = "panoptic_maskrcnn_deeplabv3"

    def __init__(self, settings: ModelSettings) -> None:
        self.settings = settings
        self.categories = COCO_THING_IDS + STUFF_IDS
        # weights_backbone=None everywhere: torchvision would otherwise download ImageNet weights.
        self.module = torch.nn.ModuleDict({
            "instance": maskrcnn_resnet50_fpn(weights=None, weights_backbone=None, num_classes=91,
                                              min_size=settings.min_size, max_size=settings.max_size),
            "semantic": deeplabv3_resnet50(weights=None, weights_backbone=None, num_classes=len(STUFF_IDS) + 1,
                                           aux_loss=False),
        })
        load_state_dict(self.module, settings, self.name)
        self.module.to(settings.device).eval()
        self._stuff = torch.tensor([0, *STUFF_IDS])
        self._valid = torch.tensor(COCO_THING_IDS, device=settings.device)
        # ImageNet normalisation, which the semantic head expects (Mask R-CNN normalises inside).
        self._mean = torch.tensor([0.485, 0.456, 0.406], device=settings.device)[:, None, None]
        self._std = torch.tensor([0.229, 0.224, 0.225], device=settings.device)[:, None, None]

    @torch.inference_mode()
    def predict(self, images: list[np.ndarray], image_ids: list[int], file_names: list[str]) -> list[ImagePrediction]:
        tensors = to_tensors(images, self.settings.device)
        instances = self.module["instance"](tensors)
        predictions = []
        for tensor, image_id, file_name, out in zip(tensors, image_ids, file_names, instances):
            logits = self.module["semantic"](((tensor - self._mean) / self._std)[None])["out"][0]
            semantic = self._stuff[logits.argmax(dim=0).cpu()].numpy()
            keep = (out["scores"] >= self.settings.score_threshold) & torch.isin(out["labels"], self._valid)
            predictions.append(fuse(
                image_id, file_name, out["masks"][keep, 0].cpu().numpy(), out["scores"][keep].cpu().double().numpy(),
                out["labels"][keep].cpu().numpy(), semantic, set(STUFF_IDS), self.settings.fusion))
        return predictions


def build_panoptic(settings: ModelSettings) -> PanopticModel:
    return PanopticModel(settings)
