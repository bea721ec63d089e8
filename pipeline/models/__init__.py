"""Model registry: name -> builder, imported on first use (torch and torchvision load only where a model runs)."""

from __future__ import annotations

from importlib import import_module

from pipeline.errors import SegpipeError
from pipeline.models.base import Model, ModelSettings

BUILDERS = {
    "maskrcnn_resnet50_fpn": "pipeline.models.maskrcnn:build_maskrcnn",
    "maskrcnn_resnet50_fpn_v2": "pipeline.models.maskrcnn:build_maskrcnn_v2",
    "panoptic_maskrcnn_deeplabv3": "pipeline.models.panoptic:build_panoptic",
    "segpipe_small": "pipeline.models.small:build_small",
}


def check_model_name(name: str) -> None:
    if name not in BUILDERS:
        raise SegpipeError(f"unknown model {name!r}; known: {', '.join(sorted(BUILDERS))}")


def load_model(name: str, settings: ModelSettings = ModelSettings()) -> Model:
    """The named model with its weights (from `settings.weights`, or random when asked for explicitly)."""
    check_model_name(name)
    module, function = BUILDERS[name].split(":")
    return getattr(import_module(module), function)(settings)


def describe(name: str, settings: ModelSettings) -> tuple[list[dict], bool]:
    """The categories a model emits and whether it is panoptic (segments never overlap), without
    building it: the driver of a run needs both and should not load the weights to learn them."""
    from pipeline.models.outputs import panoptic_categories, thing_categories

    check_model_name(name)
    if name == "segpipe_small":
        from pipeline.models.base import read_checkpoint
        from pipeline.models.small import categories_of

        return categories_of(settings, read_checkpoint(settings.weights, name) if settings.weights else None), True
    if name.startswith("panoptic_"):
        return panoptic_categories(), True
    return thing_categories(), False


__all__ = ["BUILDERS", "Model", "ModelSettings", "check_model_name", "describe", "load_model"]
