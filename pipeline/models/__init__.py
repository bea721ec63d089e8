"""Model registry: name -> the adapter class of its family, imported on first use (torch and torchvision load
only where a model runs). Adding a family is one file (its adapter, see `pipeline.models.base.Model`) and
one line here."""

from __future__ import annotations

from importlib import import_module

from pipeline.errors import SegpipeError
from pipeline.models.base import INSTANCE, PANOPTIC, PROPOSALS, Model, ModelSettings

MODELS = {
    "segpipe_small": "pipeline.models.small:SmallPanoptic",
    "maskrcnn_resnet50_fpn": "pipeline.models.maskrcnn:MaskRCNN",
    "maskrcnn_resnet50_fpn_v2": "pipeline.models.maskrcnn:MaskRCNN",
    "panoptic_maskrcnn_deeplabv3": "pipeline.models.panoptic:PanopticModel",
    "sam_vit_b": "pipeline.models.sam:Sam",
    "sam_vit_l": "pipeline.models.sam:Sam",
    "sam_vit_h": "pipeline.models.sam:Sam",
}


def check_model_name(name: str) -> None:
    if name not in MODELS:
        raise SegpipeError(f"unknown model {name!r}; known: {', '.join(MODELS)}")


def family(name: str) -> type[Model]:
    """The adapter class of the named model."""
    check_model_name(name)
    module, attribute = MODELS[name].split(":")
    return getattr(import_module(module), attribute)


def load_model(name: str, settings: ModelSettings = ModelSettings()) -> Model:
    """The named model with its weights (from `settings.weights`, or random when asked for explicitly)."""
    return family(name).build(name, settings)


def describe(name: str, settings: ModelSettings) -> tuple[list[dict], bool]:
    """The categories a model emits and whether it is panoptic (segments never overlap), without
    building it: the driver of a run needs both and should not load the weights to learn them."""
    adapter = family(name)
    return adapter.describe(name, settings), adapter.kind == PANOPTIC


def trainable() -> list[str]:
    """The registry's names that `segpipe train` can train."""
    return [name for name in MODELS if family(name).objective is not None]


__all__ = ["INSTANCE", "MODELS", "PANOPTIC", "PROPOSALS", "Model", "ModelSettings", "check_model_name",
           "describe", "family", "load_model", "trainable"]
