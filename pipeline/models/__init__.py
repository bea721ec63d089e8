"""Model registry: a plain dict of builders, each returning an adapter with one interface."""

from __future__ import annotations

from pipeline.errors import SegpipeError
from pipeline.models.base import InstanceModel, ModelSettings
from pipeline.models.maskrcnn import build_maskrcnn, build_maskrcnn_v2
from pipeline.models.panoptic import build_panoptic

BUILDERS = {
    "maskrcnn_resnet50_fpn": build_maskrcnn,
    "maskrcnn_resnet50_fpn_v2": build_maskrcnn_v2,
    "panoptic_maskrcnn_deeplabv3": build_panoptic,
}


def load_model(name: str, settings: ModelSettings = ModelSettings()) -> InstanceModel:
    """The named model with its weights (from `settings.weights`, or random when asked for explicitly)."""
    if name not in BUILDERS:
        raise SegpipeError(f"unknown model {name!r}; known: {', '.join(sorted(BUILDERS))}")
    return BUILDERS[name](settings)


__all__ = ["BUILDERS", "InstanceModel", "ModelSettings", "load_model"]
