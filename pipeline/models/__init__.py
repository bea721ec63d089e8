"""Model registry: a plain dict of builders, each returning an adapter with one interface."""

from __future__ import annotations

from pipeline.errors import SegpipeError
from pipeline.models.base import Model, ModelSettings
from pipeline.models.maskrcnn import build_maskrcnn, build_maskrcnn_v2
from pipeline.models.panoptic import build_panoptic
from pipeline.models.small import build_small

BUILDERS = {
    "maskrcnn_resnet50_fpn": build_maskrcnn,
    "maskrcnn_resnet50_fpn_v2": build_maskrcnn_v2,
    "panoptic_maskrcnn_deeplabv3": build_panoptic,
    "segpipe_small": build_small,
}


def check_model_name(name: str) -> None:
    if name not in BUILDERS:
        raise SegpipeError(f"unknown model {name!r}; known: {', '.join(sorted(BUILDERS))}")


def load_model(name: str, settings: ModelSettings = ModelSettings()) -> Model:
    """The named model with its weights (from `settings.weights`, or random when asked for explicitly)."""
    check_model_name(name)
    return BUILDERS[name](settings)


__all__ = ["BUILDERS", "Model", "ModelSettings", "check_model_name", "load_model"]
