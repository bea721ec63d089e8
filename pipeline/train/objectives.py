"""How each model family learns: its training batch from decoded samples, its loss and its optimiser."""

from __future__ import annotations

from abc import ABC, abstractmethod

import numpy as np
import torch
import torch.nn.functional as F

from pipeline.errors import SegpipeError
from pipeline.models.base import Model, to_tensors
from pipeline.models.outputs import STRIDE, bottom_up_targets
from pipeline.train.data import Sample


class Objective(ABC):
    """A model adapter's training side. `loss` runs the (possibly DDP-wrapped) module in train mode."""

    things_only: bool
    """True when the model learns thing categories only (stuff labels are ignored)."""
    ignores_unlabelled: bool
    """True when pixels no segment covers are ignored by the loss (VOID), so partial labels (pseudo-labels,
    whose rejected segments are left out) are never taught as background."""
    learning_rate: float
    """Default peak learning rate at a batch of 8."""

    def __init__(self, adapter: Model) -> None:
        self.adapter = adapter
        self.device = adapter.settings.device

    def train_mode(self) -> None:
        self.adapter.module.train()

    @abstractmethod
    def loss(self, module: torch.nn.Module, samples: list[Sample]) -> tuple[torch.Tensor, dict[str, float]]:
        """The batch's loss (a mean over its samples) and its named parts."""

    @abstractmethod
    def optimizer(self, parameters, learning_rate: float) -> torch.optim.Optimizer:
        """The optimiser the model family trains with, over `parameters` (those that require grad)."""


class BottomUpObjective(Objective):
    """segpipe_small, the Panoptic-DeepLab way: cross-entropy on the semantic logits (upsampled to the image,
    VOID ignored), mean squared error on the centre heatmap, L1 on the offsets of thing pixels."""

    things_only = False
    ignores_unlabelled = True
    learning_rate = 2e-3
    centre_weight = 200.0
    offset_weight = 0.01

    def __init__(self, adapter: Model) -> None:
        super().__init__(adapter)
        self.category_ids = tuple(c["id"] for c in adapter.categories)
        self.isthing = tuple(bool(c["isthing"]) for c in adapter.categories)

    def loss(self, module, samples):
        targets = [bottom_up_targets(s.ids, s.segments, self.category_ids, self.isthing) for s in samples]
        x = self.adapter.batch([s.image for s in samples])
        n, _, height, width = x.shape
        semantic = torch.full((n, height, width), 255, dtype=torch.long)
        centre = torch.zeros(n, height // STRIDE, width // STRIDE)
        offset = torch.zeros(n, 2, height // STRIDE, width // STRIDE)
        weight = torch.zeros(n, height // STRIDE, width // STRIDE)
        for i, t in enumerate(targets):  # padding is VOID with no centres
            h, w = t["semantic"].shape
            hs, ws = t["centre"].shape
            semantic[i, :h, :w] = torch.from_numpy(t["semantic"].astype(np.int64))
            centre[i, :hs, :ws] = torch.from_numpy(t["centre"])
            offset[i, :, :hs, :ws] = torch.from_numpy(t["offset"])
            weight[i, :hs, :ws] = torch.from_numpy(t["offset_weight"])
        semantic, centre, offset, weight = (t.to(self.device) for t in (semantic, centre, offset, weight))
        out = module(x)
        logits = F.interpolate(out["semantic"], scale_factor=STRIDE, mode="bilinear", align_corners=False)
        semantic_loss = F.cross_entropy(logits, semantic, ignore_index=255)
        centre_loss = F.mse_loss(out["centre"][:, 0], centre) * self.centre_weight
        offset_l1 = F.l1_loss(out["offset"], offset, reduction="none").sum(1)
        offset_loss = (offset_l1 * weight).sum() / weight.sum().clamp(min=1) * self.offset_weight
        total = semantic_loss + centre_loss + offset_loss
        return total, {"semantic": semantic_loss.item(), "centre": centre_loss.item(), "offset": offset_loss.item()}

    def optimizer(self, parameters, learning_rate):
        return torch.optim.AdamW(parameters, lr=learning_rate, weight_decay=1e-4)


class MaskRCNNObjective(Objective):
    """torchvision Mask R-CNN: its own losses (RPN, box, mask) from non-crowd thing instances; crowds unused."""

    things_only = True
    ignores_unlabelled = False  # torchvision's losses take every unmatched anchor and proposal as background
    learning_rate = 0.005  # torchvision's reference recipe: 0.02 at a batch of 16, scaled to 8 and fine-tuning

    def __init__(self, adapter: Model) -> None:
        super().__init__(adapter)
        self.thing_ids = {c["id"] for c in adapter.categories}

    def train_mode(self) -> None:
        """Batch norm stays frozen (statistics and affine), as torchvision fine-tunes detection models: a few
        images per worker are too few to estimate batch statistics."""
        self.adapter.module.train()
        for layer in self.adapter.module.modules():
            if isinstance(layer, torch.nn.modules.batchnorm._BatchNorm):
                layer.eval()
                layer.requires_grad_(False)

    def loss(self, module, samples):
        targets = []
        for s in samples:
            things = [seg for seg in s.segments if seg["category_id"] in self.thing_ids and not seg.get("iscrowd")]
            masks = np.stack([s.ids == seg["id"] for seg in things]) if things else np.zeros((0, *s.ids.shape), bool)
            keep = masks.reshape(len(masks), -1).any(1)
            masks, things = masks[keep], [t for t, k in zip(things, keep) if k]
            boxes = np.zeros((len(masks), 4), np.float32)
            for k, mask in enumerate(masks):
                ys, xs = np.nonzero(mask)
                boxes[k] = xs.min(), ys.min(), xs.max() + 1, ys.max() + 1
            targets.append({"boxes": torch.from_numpy(boxes).to(self.device),
                            "labels": torch.tensor([t["category_id"] for t in things], dtype=torch.int64,
                                                   device=self.device),
                            "masks": torch.from_numpy(masks.astype(np.uint8)).to(self.device)})
        losses = module(to_tensors([s.image for s in samples], self.device), targets)
        total = sum(losses.values())
        return total, {name.removeprefix("loss_"): value.item() for name, value in losses.items()}

    def optimizer(self, parameters, learning_rate):
        return torch.optim.SGD(parameters, lr=learning_rate, momentum=0.9, weight_decay=1e-4)


def objective_for(adapter: Model) -> Objective:
    """The training objective the adapter's family declares (`Model.objective`)."""
    from importlib import import_module

    from pipeline.models import trainable

    if adapter.objective is None:
        raise SegpipeError(f"{adapter.name}: cannot be trained by segpipe (trainable: {', '.join(trainable())})")
    module, attribute = adapter.objective.split(":")
    return getattr(import_module(module), attribute)(adapter)
