"""The 133 COCO panoptic categories (things keep their COCO detection ids), shipped with the package."""

import json
from functools import cache
from importlib import resources


@cache
def coco_panoptic_categories() -> tuple[dict, ...]:
    """Each category as COCO writes it: id, name, supercategory, isthing, color."""
    text = resources.files("pipeline").joinpath("data/panoptic_coco_categories.json").read_text()
    return tuple(json.loads(text))


def category_by_id() -> dict[int, dict]:
    return {c["id"]: c for c in coco_panoptic_categories()}
