"""The report's Contents: images, segments, classes, sizes, segments per image, crowd and VOID, as counts that add."""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass, field

import numpy as np
from pycocotools import mask as mask_utils

from pipeline.structures import ImagePrediction

COCO_SMALL, COCO_LARGE = 32**2, 96**2  # COCO's area ranges: small < 32², medium < 96², large above
SIZE_BINS = 25  # finer: bin k holds areas in [2^(k-1), 2^k), bin 0 the empty masks; the last bin everything above
MAX_PER_IMAGE = 100  # segments-per-image histogram: 0..99 one bin each, the last bin 100 or more


@dataclass
class ContentsStats:
    """Counts over a run of images; two of them add (`+=`), so shards merge in any grouping to the same numbers."""

    images: int
    pixels: int
    segments: np.ndarray  # per category (position in the category list): segments
    images_with: np.ndarray  # per category: images holding at least one of its segments
    area: np.ndarray  # per category: pixels (the segments' areas)
    crowd_segments: int = 0
    crowd_pixels: int = 0
    void_pixels: int = 0  # panoptic: pixels of no segment; instances: pixels under no mask
    unknown_segments: int = 0  # segments whose category the category list lacks
    coco_sizes: np.ndarray = field(default_factory=lambda: np.zeros(3, np.int64))  # things, not crowd: S, M, L
    size_bins: np.ndarray = field(default_factory=lambda: np.zeros(SIZE_BINS, np.int64))
    per_image: np.ndarray = field(default_factory=lambda: np.zeros(MAX_PER_IMAGE + 1, np.int64))
    most_per_image: int = 0
    image_sizes: Counter = field(default_factory=Counter)  # (height, width) -> images

    @classmethod
    def zeros(cls, n_categories: int) -> ContentsStats:
        return cls(0, 0, *(np.zeros(n_categories, np.int64) for _ in range(3)))

    def __iadd__(self, other: ContentsStats) -> ContentsStats:
        for name in ("images", "pixels", "segments", "images_with", "area", "crowd_segments", "crowd_pixels",
                     "void_pixels", "unknown_segments", "coco_sizes", "size_bins", "per_image"):
            setattr(self, name, getattr(self, name) + getattr(other, name))
        self.most_per_image = max(self.most_per_image, other.most_per_image)
        self.image_sizes += other.image_sizes
        return self


def image_stats(image: ImagePrediction, category_index: dict[int, int], isthing: np.ndarray, panoptic: bool
                ) -> ContentsStats:
    """The counts of one image's ground truth."""
    stats = ContentsStats.zeros(len(category_index))
    stats.images, stats.pixels = 1, image.height * image.width
    stats.image_sizes[(image.height, image.width)] = 1
    stats.per_image[min(len(image.segments), MAX_PER_IMAGE)] = 1
    stats.most_per_image = len(image.segments)
    present = set()
    for segment in image.segments:
        k = category_index.get(segment.category_id)
        if k is None:
            stats.unknown_segments += 1
            continue
        stats.segments[k] += 1
        stats.area[k] += segment.area
        present.add(k)
        if segment.iscrowd:
            stats.crowd_segments += 1
            stats.crowd_pixels += segment.area
        elif isthing[k]:
            stats.coco_sizes[0 if segment.area < COCO_SMALL else 1 if segment.area < COCO_LARGE else 2] += 1
            stats.size_bins[min(int(segment.area).bit_length(), SIZE_BINS - 1)] += 1
    stats.images_with[list(present)] = 1
    stats.void_pixels = stats.pixels - _labelled_pixels(image, panoptic)
    return stats


def _labelled_pixels(image: ImagePrediction, panoptic: bool) -> int:
    """Pixels under some segment: panoptic segments never overlap, so their areas add; instances may overlap."""
    if panoptic or not image.segments:
        return sum(s.area for s in image.segments)
    union = mask_utils.merge([s.rle.encoded() for s in image.segments], intersect=False)
    return int(mask_utils.area(union))


def shard(data, context) -> ContentsStats:
    """Contents of a shard's ground truth."""
    category_index = {c["id"]: k for k, c in enumerate(context.categories)}
    isthing = np.array([c.get("isthing", 1) == 1 for c in context.categories], bool)
    total = ContentsStats.zeros(len(category_index))
    for image in data.truth:
        total += image_stats(image, category_index, isthing, context.kind == "panoptic")
    return total


def merge(parts: list[ContentsStats], context) -> dict:
    """The Contents section of report.json."""
    total = ContentsStats.zeros(len(context.categories))
    for part in parts:
        total += part
    segments = int(total.segments.sum())
    labelled = int(total.area.sum())
    things = [c.get("isthing", 1) == 1 for c in context.categories]
    per_class = [{"id": c["id"], "name": c.get("name", str(c["id"])), "isthing": bool(thing),
                  "segments": int(total.segments[k]), "images": int(total.images_with[k]), "pixels": int(total.area[k]),
                  "share_of_pixels": _share(int(total.area[k]), total.pixels)}
                 for k, (c, thing) in enumerate(zip(context.categories, things))]
    edges = [0] + [2**k for k in range(SIZE_BINS)]
    return {
        "images": total.images,
        "segments": segments,
        "pixels": total.pixels,
        "classes": {"listed": len(things), "things": sum(things), "stuff": len(things) - sum(things),
                    "present": int((total.segments > 0).sum()),
                    "things_present": int(sum(1 for k, t in enumerate(things) if t and total.segments[k])),
                    "stuff_present": int(sum(1 for k, t in enumerate(things) if not t and total.segments[k]))},
        "per_class": per_class,
        "instance_sizes": {
            "coco": dict(zip(("small", "medium", "large"), total.coco_sizes.tolist())),
            "bins": [{"min_area": edges[k], "max_area": None if k == SIZE_BINS - 1 else edges[k + 1],
                      "instances": int(n)} for k, n in enumerate(total.size_bins)],
        },
        "segments_per_image": {
            "mean": _share(segments + total.unknown_segments, total.images),
            "max": total.most_per_image,
            "histogram": [{"segments": k, "images": int(n), "or_more": k == MAX_PER_IMAGE}
                          for k, n in enumerate(total.per_image) if n],
        },
        "image_sizes": [{"height": h, "width": w, "images": n}
                        for (h, w), n in sorted(total.image_sizes.items(), key=lambda item: (-item[1], item[0]))],
        "crowd": {"segments": total.crowd_segments, "share_of_segments": _share(total.crowd_segments, segments),
                  "pixels": total.crowd_pixels, "share_of_labelled_pixels": _share(total.crowd_pixels, labelled)},
        "void": {"pixels": total.void_pixels, "share_of_pixels": _share(total.void_pixels, total.pixels)},
        "unknown_category_segments": total.unknown_segments,
    }


def _share(part: int, whole: int) -> float:
    return part / whole if whole else 0.0
