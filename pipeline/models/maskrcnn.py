"""torchvision Mask R-CNN (resnet50 FPN, v1 and v2) as an instance model emitting COCO's 91-index ids."""

from __future__ import annotations

import numpy as np
import torch
from torchvision.models.detection import maskrcnn_resnet50_fpn, maskrcnn_resnet50_fpn_v2

from pipeline.models.base import ModelSettings, load_state_dict, to_tensors
from pipeline.structures import ImagePrediction, Segment

COCO_THING_IDS = [i for i in range(1, 91) if i not in (12, 26, 29, 30, 45, 66, 68, 69, 71, 83)]


class MaskRCNN:
    """A torchvision Mask R-CNN; its labels are COCO category ids (the 91-index, 80 used)."""

    def __init__(self, name: str, module: torch.nn.Module, settings: ModelSettings) -> None:
        self.name = name
        self.categories = COCO_THING_IDS
        self.settings = settings
        self.module = module.to(settings.device).eval()
        self._valid = torch.tensor(COCO_THING_IDS, device=settings.device)

    @torch.inference_mode()
    def predict(self, images: list[np.ndarray], image_ids: list[int], file_names: list[str]) -> list[ImagePrediction]:
        tensors = to_tensors(images, self.settings.device)
        outputs = self.module(tensors)
        predictions = []
        for image, image_id, file_name, out in zip(images, image_ids, file_names, outputs):
            # The 10 "N/A" slots of torchvision's 91-index are no COCO category: never emitted.
            keep = (out["scores"] >= self.settings.score_threshold) & torch.isin(out["labels"], self._valid)
            masks = (out["masks"][keep, 0] > self.settings.mask_threshold).cpu().numpy()
            scores = out["scores"][keep].cpu().double().numpy()
            labels = out["labels"][keep].cpu().numpy()
            segments = tuple(Segment.from_mask(k + 1, int(label), mask, score=float(score))
                             for k, (mask, score, label) in enumerate(zip(masks, scores, labels)))
            predictions.append(ImagePrediction(image_id, file_name, image.shape[0], image.shape[1], segments))
        return predictions


def _build(name: str, builder, settings: ModelSettings) -> MaskRCNN:
    # weights_backbone=None: torchvision would otherwise download ImageNet weights.
    module = builder(weights=None, weights_backbone=None, num_classes=91,
                     min_size=settings.min_size, max_size=settings.max_size)
    load_state_dict(module, settings, name)
    return MaskRCNN(name, module, settings)


def build_maskrcnn(settings: ModelSettings) -> MaskRCNN:
    return _build("maskrcnn_resnet50_fpn", maskrcnn_resnet50_fpn, settings)


def build_maskrcnn_v2(settings: ModelSettings) -> MaskRCNN:
    return _build("maskrcnn_resnet50_fpn_v2", maskrcnn_resnet50_fpn_v2, settings)
