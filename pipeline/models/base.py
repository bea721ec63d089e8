"""What every model adapter takes (settings) and gives (ImagePrediction), and how weights are loaded."""

from __future__ import annotations

import io
from dataclasses import dataclass
from typing import Protocol

import numpy as np
import torch

from pipeline.errors import SegpipeError
from pipeline.fusion import FusionConfig
from pipeline.io.fs import read_bytes
from pipeline.structures import ImagePrediction


@dataclass(frozen=True)
class ModelSettings:
    """How to build a model. Nothing is ever downloaded: weights come from a path or URI, or are random."""

    weights: str | None = None
    """Checkpoint (a state dict saved with torch.save) at a local path or any fsspec URI."""
    random_weights: bool = False
    """Initialise randomly instead (smoke runs, benchmarks); never implied by a missing --weights."""
    device: str = "cpu"
    score_threshold: float = 0.05
    """Detections scoring below this are not returned."""
    mask_threshold: float = 0.5
    """A pixel belongs to an instance when its mask probability exceeds this."""
    min_size: int = 800
    """Shorter image side the model resizes to (torchvision's default for COCO)."""
    max_size: int = 1333
    fusion: FusionConfig = FusionConfig()
    """Thresholds of the panoptic merge (panoptic models only)."""


class InstanceModel(Protocol):
    name: str
    categories: list[int]
    """Category ids the model emits."""

    def predict(self, images: list[np.ndarray], image_ids: list[int], file_names: list[str]) -> list[ImagePrediction]:
        """Predictions for a batch of H x W x 3 uint8 RGB images."""


def to_tensors(images: list[np.ndarray], device: str) -> list[torch.Tensor]:
    """H x W x 3 uint8 images as 3 x H x W float tensors in [0, 1], as torchvision's models take them."""
    return [torch.from_numpy(np.ascontiguousarray(im)).permute(2, 0, 1).float().div_(255).to(device) for im in images]


def load_state_dict(module: torch.nn.Module, settings: ModelSettings, architecture: str) -> None:
    """Weights into `module`, or a clear error naming the file and the expected architecture."""
    if settings.weights is None:
        if settings.random_weights:
            return
        raise SegpipeError(f"{architecture}: no weights given (pass a checkpoint path or URI, or ask for random weights)")
    data = read_bytes(settings.weights)
    try:
        state = torch.load(io.BytesIO(data), map_location="cpu", weights_only=True)
    except Exception as error:  # torch raises many types for a file that is not a checkpoint
        raise SegpipeError(f"{settings.weights}: not a readable PyTorch checkpoint ({type(error).__name__})") from None
    if isinstance(state, dict) and "model" in state and isinstance(state["model"], dict):
        state = state["model"]  # a training checkpoint with metadata beside the weights
    if not isinstance(state, dict):
        raise SegpipeError(f"{settings.weights}: holds a {type(state).__name__}, expected a state dict of {architecture}")
    try:
        module.load_state_dict(state)
    except RuntimeError as error:
        first = str(error).splitlines()[1].strip() if "\n" in str(error) else str(error)
        raise SegpipeError(f"{settings.weights}: does not fit {architecture} ({first})") from None
