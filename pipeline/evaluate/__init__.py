"""Evaluation: PQ, AP and mIoU from per-shard statistics that add; here, the checks every evaluator makes of its inputs."""

from pipeline.errors import SegpipeError


def check_integer_ids(image_ids: list, where: str) -> None:
    """COCO image ids are integers: tables store them so, and shards are runs of sorted ids."""
    bad = next((i for i in image_ids if not isinstance(i, int) or isinstance(i, bool)), None)
    if bad is not None or None in image_ids:
        raise SegpipeError(f"{where}: image id {bad!r} is not an integer (COCO image ids are)")


def refuse_strays(seen, known, where: str, noun: str) -> None:
    """Refuse predictions of images the ground truth lacks (pycocotools' loadRes refuses them; mostly an id mix-up)."""
    stray = sorted(set(seen) - set(known), key=str)
    if stray:
        raise SegpipeError(f"{where}: {noun} for image {stray[0]}, which is not in the ground truth"
                           + (f" (and {len(stray) - 1} more)" if len(stray) > 1 else ""))
