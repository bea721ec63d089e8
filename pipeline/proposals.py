"""`segpipe classify`: class-agnostic proposals (SAM's) given a class by a panoptic model's prediction of the same image.

Reads the proposals folder part by part (memory holds one part and the panoptic rows of its images) and writes

    OUT/predictions/part-NNNNN.parquet  the classified proposals (category, class_agreement), a predictions table
    OUT/categories.json                 the panoptic model's categories
    OUT/classify.json                   counts: proposals, classified, unclassified (no labelled pixel), per class
    OUT/run.json                        the proposals' run (its "input" kept, so `segpipe train` finds the images)

so OUT goes through `segpipe filter` (`--min-class-agreement`) and training like the engine's own predictions.
"""

from __future__ import annotations

from dataclasses import replace

import numpy as np
import pyarrow.parquet as pq

from pipeline.errors import SegpipeError
from pipeline.filtering import read_infer_output
from pipeline.io.fs import join, read_json, url_to_fs, write_json
from pipeline.io.tables import parquet_files, read_predictions, write_predictions
from pipeline.structures import ImagePrediction, Segment, predictions_from_arrow


def segment_map(panoptic: ImagePrediction) -> np.ndarray:
    """Each pixel's segment as its position + 1 in `panoptic.segments`, 0 where none covers it (VOID)."""
    index = np.zeros((panoptic.height, panoptic.width), np.int32)
    for k, segment in enumerate(panoptic.segments):
        mask = segment.rle.to_mask()
        if index[mask].any():
            raise SegpipeError(f"image {panoptic.image_id} ({panoptic.file_name}): panoptic segment {segment.id} "
                               "overlaps another; --panoptic must be a panoptic model's output")
        index[mask] = k + 1
    return index


def classify(proposal: Segment, index: np.ndarray, categories: list[int]) -> tuple[int, float] | None:
    """The category covering most of the proposal's pixels and its share of them (VOID pixels count against
    it; ties go to the smaller category id); None when no pixel of the proposal is labelled.

    `index` is `segment_map`'s, `categories` the category of each of its segments in order.
    """
    pixels = np.bincount(index[proposal.rle.to_mask()], minlength=len(categories) + 1)
    by_category: dict[int, int] = {}
    for category, count in zip(categories, pixels[1:].tolist()):
        by_category[category] = by_category.get(category, 0) + count
    best = min(by_category.items(), key=lambda item: (-item[1], item[0]), default=(None, 0))
    if best[1] == 0:
        return None
    return best[0], best[1] / int(pixels.sum())


def classify_image(proposals: ImagePrediction, panoptic: ImagePrediction | None) -> tuple[ImagePrediction, int]:
    """The image's classified proposals, largest first, and how many had no labelled pixel (left out).

    Largest first because `segpipe train` paints pseudo-label segments in row order: a smaller proposal lying
    on a larger one is painted after it and keeps its pixels, as COCO's panoptic conversion does.
    """
    if panoptic is None:
        return replace(proposals, segments=()), len(proposals.segments)
    if (panoptic.height, panoptic.width) != (proposals.height, proposals.width):
        raise SegpipeError(f"image {proposals.file_name}: the proposals are {proposals.height}x{proposals.width}, "
                           f"the panoptic prediction {panoptic.height}x{panoptic.width}")
    index, categories = segment_map(panoptic), [s.category_id for s in panoptic.segments]
    classified = []
    for proposal in proposals.segments:
        found = classify(proposal, index, categories)
        if found is not None:
            classified.append(replace(proposal, category_id=found[0], class_agreement=found[1]))
    classified.sort(key=lambda s: -s.area)  # stable: equal areas keep the proposals' order
    return replace(proposals, segments=tuple(classified)), len(proposals.segments) - len(classified)


def run(proposals: str, panoptic: str, out: str) -> dict:
    """Classify the proposals of the folder `proposals` by the panoptic folder `panoptic` into `out`; returns
    what classify.json holds. Images are paired by file name (the two runs may number them differently)."""
    source, labeller = read_infer_output(proposals), read_infer_output(panoptic)
    if len(source["categories"]) != 1:
        raise SegpipeError(f"{proposals}: has {len(source['categories'])} categories; --proposals must be "
                           "class-agnostic (one category, e.g. SAM's 'object')")
    previous = join(out, "classify.json")
    if url_to_fs(previous)[0].exists(url_to_fs(previous)[1]):
        earlier = read_json(previous)
        if (earlier.get("proposals"), earlier.get("panoptic")) != (proposals, panoptic):
            raise SegpipeError(f"{out}: holds the classes of other proposals or panoptic predictions; use another "
                               "--out, or delete it to start over")
    labelled_files = parquet_files(join(panoptic, "predictions"))
    counts = {"images": 0, "images_without_panoptic": 0, "proposals": 0, "classified": 0, "unclassified": 0}
    per_category: dict[int, int] = {}
    for part, uri in enumerate(parquet_files(join(proposals, "predictions"))):
        fs, path = url_to_fs(uri)
        images = predictions_from_arrow(pq.read_table(path, filesystem=fs))
        by_name = {p.file_name: p for p in read_predictions(labelled_files, file_names=[p.file_name for p in images])}
        classified = []
        for image in images:
            result, unclassified = classify_image(image, by_name.get(image.file_name))
            counts["images"] += 1
            counts["images_without_panoptic"] += image.file_name not in by_name
            counts["proposals"] += len(image.segments)
            counts["classified"] += len(result.segments)
            counts["unclassified"] += unclassified
            for s in result.segments:
                per_category[s.category_id] = per_category.get(s.category_id, 0) + 1
            classified.append(result)
        write_predictions(join(out, "predictions", f"part-{part:05d}.parquet"), classified,
                          source["run"].get("run_id", "classify"), source["run"].get("model", ""))
    write_json(join(out, "categories.json"), labeller["categories"])
    summary = {"proposals": proposals, "panoptic": panoptic, "counts": counts,
               "per_category": {str(k): n for k, n in sorted(per_category.items())}}
    write_json(previous, summary)
    # Last: run.json makes OUT a dataset `segpipe train` and `segpipe filter` read (the proposals' images).
    write_json(join(out, "run.json"), {**source["run"], "classified_from": proposals, "panoptic": panoptic})
    return summary
