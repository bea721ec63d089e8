"""segpipe's built-in small panoptic model: a light encoder-decoder with semantic, centre and offset heads,
grouped bottom-up the Panoptic-DeepLab way. Small enough to train from scratch on a CPU in minutes."""

from __future__ import annotations

from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from pipeline.categories import coco_panoptic_categories
from pipeline.errors import SegpipeError
from pipeline.models.base import PANOPTIC, Model, ModelSettings, build_module, read_checkpoint, to_tensors
from pipeline.models.outputs import STRIDE, BottomUpPostprocess, pack_masks
from pipeline.signals import soft_cuts

NAME = "segpipe_small"
MEAN = (0.485, 0.456, 0.406)
STD = (0.229, 0.224, 0.225)


def _block(cin: int, cout: int, stride: int = 1, dilation: int = 1) -> nn.Sequential:
    return nn.Sequential(nn.Conv2d(cin, cout, 3, stride, dilation, dilation, bias=False), nn.BatchNorm2d(cout),
                         nn.ReLU(inplace=True))


class SmallPanopticNet(nn.Module):
    """Encoder to 1/32, a top-down decoder back to 1/4, and three heads there: semantic logits (one per
    category), a centre heatmap (1 at instance centres, Gaussian around them) and offsets (pixel to centre,
    in input pixels). About 0.6 M parameters."""

    def __init__(self, num_classes: int, width: int = 32) -> None:
        super().__init__()
        w = width
        self.stem = nn.Sequential(_block(3, w // 2, 2), _block(w // 2, w, 2))               # 1/4
        self.down8 = nn.Sequential(_block(w, 2 * w, 2), _block(2 * w, 2 * w))              # 1/8
        self.down16 = nn.Sequential(_block(2 * w, 3 * w, 2), _block(3 * w, 3 * w, dilation=2))  # 1/16
        self.down32 = nn.Sequential(_block(3 * w, 4 * w, 2), _block(4 * w, 4 * w, dilation=2))  # 1/32
        self.lateral = nn.ModuleList([nn.Conv2d(c, 2 * w, 1) for c in (w, 2 * w, 3 * w, 4 * w)])
        self.fuse = nn.ModuleList([_block(2 * w, 2 * w) for _ in range(3)])
        self.semantic = nn.Sequential(_block(2 * w, 2 * w), nn.Conv2d(2 * w, num_classes, 1))
        self.centre = nn.Sequential(_block(2 * w, w), nn.Conv2d(w, 1, 1))
        self.offset = nn.Sequential(_block(2 * w, w), nn.Conv2d(w, 2, 1))

    def forward(self, x: torch.Tensor) -> dict[str, torch.Tensor]:
        """x: N x 3 x H x W normalised images, H and W multiples of 32."""
        c4 = self.stem(x)
        c8 = self.down8(c4)
        c16 = self.down16(c8)
        c32 = self.down32(c16)
        top = self.lateral[3](c32)
        for level, (lateral, fuse) in enumerate(zip(self.lateral[2::-1], self.fuse)):
            skip = (c16, c8, c4)[level]
            top = fuse(lateral(skip) + F.interpolate(top, size=skip.shape[-2:], mode="nearest"))
        return {"semantic": self.semantic(top), "centre": self.centre(top), "offset": self.offset(top)}


def categories_of(settings: ModelSettings, checkpoint: dict | None) -> list[dict]:
    """The model's categories: from its checkpoint, else the dataset's, else COCO panoptic's 133."""
    found = (checkpoint or {}).get("categories") or settings.categories or coco_panoptic_categories()
    categories = [{k: c.get(k) for k in ("id", "name", "supercategory", "isthing")} for c in found]
    if settings.categories and checkpoint and checkpoint.get("categories"):
        if [c["id"] for c in settings.categories] != [c["id"] for c in categories]:
            raise SegpipeError(f"{settings.weights}: trained for categories {[c['id'] for c in categories]}, "
                               f"not the given {[c['id'] for c in settings.categories]}")
    if len(categories) > 255:
        raise SegpipeError(f"{NAME}: at most 255 categories, got {len(categories)}")
    return categories


class SmallPanoptic(Model):
    """The built-in model: `SmallPanopticNet` + `BottomUpPostprocess`, over the dataset's categories."""

    kind = PANOPTIC
    objective = "pipeline.train.objectives:BottomUpObjective"
    name = NAME

    def __init__(self, settings: ModelSettings) -> None:
        checkpoint = read_checkpoint(settings.weights, NAME) if settings.weights else None
        self.settings = settings
        self.categories = categories_of(settings, checkpoint)
        self.postprocess = BottomUpPostprocess(
            tuple(c["id"] for c in self.categories), tuple(bool(c["isthing"]) for c in self.categories),
            centre_threshold=settings.score_threshold, stuff_area=settings.fusion.stuff_area_threshold)
        self.module = build_module(lambda: SmallPanopticNet(len(self.categories)), settings, NAME, checkpoint)
        self.module.to(settings.device).eval()
        self._mean = torch.tensor(MEAN, device=settings.device)[:, None, None]
        self._std = torch.tensor(STD, device=settings.device)[:, None, None]

    def batch(self, images: list[np.ndarray]) -> torch.Tensor:
        """Normalised images zero-padded (bottom, right) to one size, a multiple of 32."""
        height = -(-max(im.shape[0] for im in images) // 32) * 32
        width = -(-max(im.shape[1] for im in images) // 32) * 32
        x = torch.zeros(len(images), 3, height, width, device=self.settings.device)
        for i, t in enumerate(to_tensors(images, self.settings.device)):
            x[i, :, : t.shape[1], : t.shape[2]] = (t - self._mean) / self._std
        return x

    @torch.inference_mode()
    def forward(self, images: list[np.ndarray]) -> list[dict[str, Any]]:
        out = self.module(self.batch(images))
        semantic = F.interpolate(out["semantic"], scale_factor=STRIDE, mode="bilinear", align_corners=False)
        top = semantic.max(1)
        labels = top.indices.to(torch.uint8).cpu().numpy()
        # The probability of each pixel's class, cut twice for the segments' stability (pipeline.signals; bits
        # only leave the actor). The softmax normaliser is taken on the head's grid and upsampled as the logits
        # are: over the full-resolution logits it would cost 40% more model time on a CPU.
        normaliser = F.interpolate(torch.logsumexp(out["semantic"], 1, keepdim=True), scale_factor=STRIDE,
                                   mode="bilinear", align_corners=False)[:, 0]
        probability = torch.exp(top.values - normaliser).clamp(max=1.0).cpu().numpy()
        centre = out["centre"][:, 0].to(torch.float16).cpu().numpy()
        offset = out["offset"].to(torch.float16).cpu().numpy()
        raws = []
        for i, image in enumerate(images):
            h, w = image.shape[:2]
            hs, ws = -(-h // STRIDE), -(-w // STRIDE)
            raws.append({"semantic": np.ascontiguousarray(labels[i, :h, :w]),
                         "centre": np.ascontiguousarray(centre[i, :hs, :ws]),
                         "offset": np.ascontiguousarray(offset[i, :, :hs, :ws]),
                         "cuts": pack_masks(soft_cuts(probability[i, :h, :w]))})
        return raws

    @classmethod
    def build(cls, name: str, settings: ModelSettings) -> SmallPanoptic:
        return cls(settings)

    @classmethod
    def describe(cls, name: str, settings: ModelSettings) -> list[dict]:
        return categories_of(settings, read_checkpoint(settings.weights, NAME) if settings.weights else None)
