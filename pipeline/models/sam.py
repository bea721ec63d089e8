"""Segment Anything (the `segment-anything` package, `pip install segpipe[sam]`): class-agnostic mask proposals
from its automatic mask generator, with its predicted IoU and stability score, for the data engine."""

from __future__ import annotations

from dataclasses import asdict
from typing import Any

import numpy as np
import torch

from pipeline.errors import SegpipeError
from pipeline.models.base import PROPOSALS, Model, ModelSettings, build_module
from pipeline.models.outputs import OBJECT, ProposalPostprocess


def _segment_anything():
    try:
        import segment_anything
    except ImportError:
        raise SegpipeError("SAM needs the segment-anything package: pip install 'segpipe[sam]'") from None
    return segment_anything


class Sam(Model):
    """SAM's image encoder, prompt encoder and mask decoder behind `SamAutomaticMaskGenerator`: a grid of
    point prompts, masks kept when their predicted IoU and stability pass, duplicates removed by box NMS
    (the knobs: `ModelSettings.proposals`). Weights are SAM's released state dicts (sam_vit_b_01ec64.pth,
    ...) from a path or URI the user gives; the variant is the model name."""

    kind = PROPOSALS
    VARIANTS = {"sam_vit_b": "vit_b", "sam_vit_l": "vit_l", "sam_vit_h": "vit_h"}

    def __init__(self, name: str, module: torch.nn.Module, settings: ModelSettings) -> None:
        self.name = name
        self.categories = [dict(OBJECT)]
        self.settings = settings
        self.postprocess = ProposalPostprocess()
        self.module = module.to(settings.device).eval()
        knobs = settings.proposals
        if knobs.min_mask_region_area > 0:
            try:
                import cv2  # noqa: F401  (SAM's small-region removal)
            except ImportError:
                raise SegpipeError("--min-region-area needs opencv: pip install 'segpipe[sam]'") from None
        self.generator = _segment_anything().SamAutomaticMaskGenerator(self.module, output_mode="coco_rle",
                                                                       **asdict(knobs))

    @torch.inference_mode()
    def forward(self, images: list[np.ndarray]) -> list[dict[str, Any]]:
        raws = []
        for image in images:  # SAM embeds one image at a time
            records = self.generator.generate(np.ascontiguousarray(image))
            raws.append({"height": image.shape[0], "width": image.shape[1],
                         "rles": [r["segmentation"]["counts"] for r in records],
                         "scores": np.array([r["predicted_iou"] for r in records], np.float64),
                         "stability": np.array([r["stability_score"] for r in records], np.float64),
                         "points": [r["point_coords"] for r in records],
                         "crop_boxes": [r["crop_box"] for r in records]})
        return raws

    @classmethod
    def build(cls, name: str, settings: ModelSettings) -> Sam:
        builder = _segment_anything().sam_model_registry[cls.VARIANTS[name]]
        return cls(name, build_module(lambda: builder(checkpoint=None), settings, name), settings)

    @classmethod
    def describe(cls, name: str, settings: ModelSettings) -> list[dict]:
        return [dict(OBJECT)]
