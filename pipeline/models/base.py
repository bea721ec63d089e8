"""What every model adapter takes (settings) and gives (raw outputs, then ImagePrediction), and how weights load."""

from __future__ import annotations

import hashlib
import io
import json
from abc import ABC, abstractmethod
from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, ClassVar

import numpy as np

from pipeline.errors import SegpipeError
from pipeline.fusion import FusionConfig
from pipeline.io.fs import read_bytes
from pipeline.models.outputs import Postprocess
from pipeline.structures import ImagePrediction

if TYPE_CHECKING:  # torch is imported where it is used: this module is also read by CPU-only workers
    import torch


@dataclass(frozen=True)
class ProposalSettings:
    """The knobs of a class-agnostic proposal generator: SAM's automatic mask generator, with its defaults."""

    points_per_side: int = 32
    """A grid of points_per_side^2 point prompts over the image (and each crop)."""
    points_per_batch: int = 64
    """Point prompts decoded at once (memory against speed)."""
    pred_iou_thresh: float = 0.88
    """Masks whose predicted IoU is below this are dropped (0: none)."""
    stability_score_thresh: float = 0.95
    """Masks less stable than this are dropped (0: none)."""
    stability_score_offset: float = 1.0
    """The stability score compares the mask cut at logit -offset and +offset."""
    box_nms_thresh: float = 0.7
    """Box IoU above which a mask with a lower predicted IoU is a duplicate."""
    crop_n_layers: int = 0
    """Also run on 2^i x 2^i crops for i = 1 .. crop_n_layers (small objects)."""
    crop_nms_thresh: float = 0.7
    crop_overlap_ratio: float = 512 / 1500
    crop_n_points_downscale_factor: int = 1
    min_mask_region_area: int = 0
    """Holes and islands smaller than this are removed from each mask (0: off; needs opencv)."""


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
    seed: int = 0
    """Seed of the random initialisation (with random_weights), so every actor builds the same model."""
    categories: tuple[dict, ...] | None = None
    """The dataset's categories (COCO dicts with id, name, isthing) for models that take them."""
    proposals: ProposalSettings = ProposalSettings()
    """Proposal generators only (SAM)."""


INSTANCE, PANOPTIC, PROPOSALS = "instance", "panoptic", "proposals"
"""What a model family gives: scored instance masks that may overlap (COCO results); a panoptic map
(segments never overlap, things and stuff); class-agnostic mask proposals (SA-1B style, one "object" class)."""


class Model(ABC):
    """An adapter: `forward` on the model's device, `postprocess` anywhere; `predict` chains them.

    A family is one file: its adapter class declares what it is (`kind`, `objective`), how to build it for
    one of its names (`build`) and what categories it emits without building it (`describe`); the registry
    (`pipeline.models.MODELS`) maps each name to the class."""

    kind: ClassVar[str]
    """INSTANCE, PANOPTIC or PROPOSALS."""
    objective: ClassVar[str | None] = None
    """"module:Class" of its training objective (pipeline.train.objectives); None: `segpipe train` cannot train it."""
    name: str
    categories: list[dict]
    """COCO category dicts (id, name, supercategory, isthing) of every id the model emits."""
    postprocess: Postprocess

    @property
    def panoptic(self) -> bool:
        """True when segments never overlap (a panoptic PNG can be written)."""
        return self.kind == PANOPTIC

    @classmethod
    @abstractmethod
    def build(cls, name: str, settings: ModelSettings) -> Model:
        """The model `name` (one of the family's registry names) with its weights."""

    @classmethod
    @abstractmethod
    def describe(cls, name: str, settings: ModelSettings) -> list[dict]:
        """The categories `build(name, settings)` would emit, without building it or loading its weights
        (a run's driver needs them; reading a checkpoint's metadata is allowed)."""

    @abstractmethod
    def forward(self, images: list[np.ndarray]) -> list[dict[str, Any]]:
        """Raw outputs (numpy arrays on the CPU) for a batch of H x W x 3 uint8 RGB images."""

    def predict(self, images: list[np.ndarray], image_ids: list[int], file_names: list[str]) -> list[ImagePrediction]:
        """Predictions for a batch of H x W x 3 uint8 RGB images."""
        return [self.postprocess(raw, image_id, file_name)
                for raw, image_id, file_name in zip(self.forward(images), image_ids, file_names)]


def to_tensors(images: list[np.ndarray], device: str) -> list[torch.Tensor]:
    """H x W x 3 uint8 images as 3 x H x W float tensors in [0, 1], as torchvision's models take them."""
    import torch

    return [torch.from_numpy(np.ascontiguousarray(im) if im.flags.writeable else im.copy())
            .permute(2, 0, 1).float().div_(255).to(device) for im in images]


VALIDATED_SETTINGS = ("score_threshold", "mask_threshold", "min_size", "max_size", "fusion")
"""The pre- and post-processing settings a `segpipe train` checkpoint was validated with (it records every
setting under "settings"): what `infer --weights` uses where they are not given, so that it reproduces the
validation numbers."""


def with_checkpoint_settings(settings: ModelSettings, architecture: str, given: dict[str, Any]) -> ModelSettings:
    """`settings` with the VALIDATED_SETTINGS that the checkpoint at `settings.weights` records, then `given`
    (name -> value; "stuff_area" for fusion's stuff_area_threshold) over them. A checkpoint that records none
    (a bare state dict, torchvision's) leaves the defaults."""
    from dataclasses import replace

    recorded = read_checkpoint(settings.weights, architecture).get("settings") if settings.weights else None
    if isinstance(recorded, dict):
        found = {k: recorded[k] for k in VALIDATED_SETTINGS if k in recorded}
        if isinstance(found.get("fusion"), dict):
            found["fusion"] = FusionConfig(**{k: v for k, v in found["fusion"].items()
                                              if k in FusionConfig.__dataclass_fields__})
        settings = replace(settings, **found)
    given = dict(given)
    if "stuff_area" in given:
        settings = replace(settings, fusion=replace(settings.fusion, stuff_area_threshold=given.pop("stuff_area")))
    return replace(settings, **given)


def read_checkpoint(uri: str, architecture: str) -> dict:
    """A checkpoint as {"model": state dict, **metadata}; a bare state dict gets no metadata."""
    import torch

    data = read_bytes(uri)
    try:
        checkpoint = torch.load(io.BytesIO(data), map_location="cpu", weights_only=True)
    except Exception as error:  # torch raises many types for a file that is not a checkpoint
        raise SegpipeError(f"{uri}: not a readable PyTorch checkpoint ({type(error).__name__})") from None
    if not isinstance(checkpoint, dict):
        raise SegpipeError(f"{uri}: holds a {type(checkpoint).__name__}, expected a state dict of {architecture}")
    if isinstance(checkpoint.get("model"), dict):
        return checkpoint  # a training checkpoint: weights under "model", metadata beside them
    return {"model": checkpoint}


def fingerprint(uri: str, architecture: str) -> str:
    """What a checkpoint holds, as 16 hex digits: sha256 over its weights (name, dtype, shape, bytes, in name
    order) and categories. The file's own bytes would not do: torch.save writes a fresh serialization id
    each time, and pickles equal metadata differently, so equal models would not compare equal."""
    import torch

    checkpoint = read_checkpoint(uri, architecture)
    digest = hashlib.sha256(json.dumps(checkpoint.get("categories"), sort_keys=True).encode())
    for name, tensor in sorted(checkpoint["model"].items()):
        if isinstance(tensor, torch.Tensor):
            digest.update(f"{name} {tensor.dtype} {tuple(tensor.shape)}".encode())
            digest.update(tensor.detach().cpu().contiguous().reshape(-1).view(torch.uint8).numpy().tobytes())
        else:
            digest.update(f"{name} {tensor!r}".encode())
    return digest.hexdigest()[:16]


def build_module(factory: Callable[[], torch.nn.Module], settings: ModelSettings, architecture: str,
                 checkpoint: dict | None = None) -> torch.nn.Module:
    """`factory()` with the weights of `settings.weights` (or `checkpoint`, already read), or with a
    random initialisation seeded by `settings.seed` when asked for; never neither."""
    import torch

    if settings.weights is None and not settings.random_weights:
        raise SegpipeError(f"{architecture}: no weights given (pass a checkpoint path or URI, or ask for random weights)")
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(settings.seed)
        module = factory()
    if settings.weights is not None:
        state = (checkpoint or read_checkpoint(settings.weights, architecture))["model"]
        try:
            result = module.load_state_dict(state, strict=False)
        except RuntimeError as error:  # shapes that differ: the first one names the mismatch
            first = next((line.strip() for line in str(error).splitlines()[1:] if line.strip()), str(error))
            raise SegpipeError(f"{settings.weights}: does not fit {architecture} ({first})") from None
        if result.missing_keys or result.unexpected_keys:
            parts = [f"{len(keys)} {kind} keys, e.g. {keys[0]!r}" for kind, keys in
                     (("missing", result.missing_keys), ("unexpected", result.unexpected_keys)) if keys]
            raise SegpipeError(f"{settings.weights}: does not fit {architecture} ({'; '.join(parts)})")
    return module
