"""Synthetic COCO datasets: textured stuff, occluding things, crowds and VOID, reproducible to the byte."""

from __future__ import annotations

import io
import math
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass, field

import numpy as np
from PIL import Image
from pycocotools import mask as mask_utils

from pipeline.categories import category_by_id
from pipeline.io.fs import join, write_bytes, write_json
from pipeline.io.shards import write_tar_shard
from pipeline.structures import Rle, encode_panoptic_png

# Thing category (COCO id) -> the shape drawn for it.
THING_SHAPES = {1: "person", 3: "box", 13: "octagon", 18: "ellipse", 37: "disc", 38: "diamond"}
# Stuff category (COCO id) -> texture. Scenes put sky (and sometimes trees) above a horizon and
# one or two ground classes below it.
STUFF_TEXTURES = {187: "sky", 184: "tree", 193: "grass", 149: "road", 155: "sea", 154: "sand"}
GROUND_PAIRS = ((193,), (149,), (193, 149), (155, 154), (154,), (193, 155))
CROWD_CLASSES = (1, 37)
MIN_THING_AREA = 10  # visible fragments smaller than this become VOID, as annotators leave them
MIN_STUFF_AREA = 64


@dataclass(frozen=True)
class SynthConfig:
    """What `segpipe synth` makes."""

    images: int
    """Number of images."""
    split: str = "train"
    """Split name: images go to `<out>/<split>/`, annotations to `<out>/annotations/*_<split>.json`."""
    seed: int = 0
    """Same seed, same bytes."""
    height: int = 256
    width: int = 256
    max_things: int = 8
    """At most this many thing instances per image (besides crowd members)."""
    crowd_probability: float = 0.25
    """Chance that an image holds one crowd region (many small instances annotated as one)."""
    void_probability: float = 0.3
    """Chance that an image holds an unlabelled (VOID) blob."""
    shard_size: int | None = None
    """Also write the images as tar shards of this many images to `<out>/shards/`."""
    workers: int = 1
    """Processes that render images; the output does not depend on it."""
    first_image_id: int = 1


@dataclass
class _Layer:
    category_id: int
    mask: np.ndarray
    polygons: list[list[float]] = field(default_factory=list)  # empty for crowd regions
    iscrowd: bool = False


def categories(isthing: bool | None = None) -> list[dict]:
    """The synthetic datasets' categories, as COCO panoptic writes them (a subset of COCO's)."""
    by_id = category_by_id()
    ids = sorted(THING_SHAPES) + sorted(STUFF_TEXTURES)
    return [dict(by_id[i]) for i in ids if isthing is None or bool(by_id[i]["isthing"]) == isthing]


def _smooth_noise(rng: np.random.Generator, height: int, width: int, cell: int) -> np.ndarray:
    """Noise in [-1, 1] that varies over about `cell` pixels (bilinear upsampling of a coarse grid)."""
    coarse = rng.random((height // cell + 2, width // cell + 2), dtype=np.float32) * 2 - 1
    return np.asarray(Image.fromarray(coarse, "F").resize((width, height), Image.BILINEAR))


def _texture(kind: str, rng: np.random.Generator, height: int, width: int) -> np.ndarray:
    """A luminance field (H x W) that makes a stuff class look like a surface, not a flat colour."""
    fine = rng.standard_normal((height, width), dtype=np.float32)
    y = np.linspace(0, 1, height, dtype=np.float32)[:, None]
    if kind == "sky":
        return 40 * (y - 0.5) + 8 * _smooth_noise(rng, height, width, 48) + 2 * fine
    if kind == "tree":
        return 35 * _smooth_noise(rng, height, width, 6) + 10 * fine
    if kind == "grass":
        return 20 * _smooth_noise(rng, height, width, 24) + 18 * fine
    if kind == "sea":
        phase = 3 * _smooth_noise(rng, height, width, 32)
        return 18 * np.sin(y * height * 0.6 + phase) + 4 * fine
    if kind == "road":
        return 8 * _smooth_noise(rng, height, width, 32) + 10 * fine
    return 12 * _smooth_noise(rng, height, width, 16) + 16 * fine  # sand


def _stuff_map(rng: np.random.Generator, height: int, width: int) -> np.ndarray:
    """Per-pixel stuff category: sky above a wavy horizon, trees sometimes, ground split in two."""
    x = np.arange(width, dtype=np.float32)
    y = np.arange(height, dtype=np.float32)[:, None]
    horizon = height * rng.uniform(0.25, 0.55) + height * 0.04 * np.sin(
        2 * np.pi * x / (width * rng.uniform(0.5, 2)) + rng.uniform(0, 2 * np.pi))
    sem = np.where(y < horizon, 187, 0).astype(np.int32)
    if rng.random() < 0.4:
        tree_top = horizon - height * rng.uniform(0.05, 0.15) * (1 + 0.5 * _smooth_noise(rng, 1, width, 12)[0])
        sem[(y >= tree_top) & (y < horizon)] = 184
    ground = GROUND_PAIRS[rng.integers(len(GROUND_PAIRS))]
    below = y >= horizon
    if len(ground) == 1:
        sem[below & (sem == 0)] = ground[0]
    else:
        split = width * rng.uniform(0.3, 0.7) + (y - height) * rng.uniform(-0.8, 0.8)
        sem[below & (x < split)] = ground[0]
        sem[below & (x >= split)] = ground[1]
    return sem


def _shape_polygons(shape: str, cx: float, cy: float, size: float, angle: float) -> list[np.ndarray]:
    """Outline(s) of a shape as (N, 2) vertex arrays, before clipping to the image."""
    def ring(n: int, rx: float, ry: float, phase: float = 0.0, x0: float = 0.0, y0: float = 0.0):
        t = np.linspace(0, 2 * np.pi, n, endpoint=False) + phase
        return np.stack([x0 + rx * np.cos(t), y0 + ry * np.sin(t)], axis=1)

    if shape == "person":  # body and head: two polygons, as COCO writes occluded or split objects
        outlines = [ring(20, 0.35 * size, size, y0=0.25 * size), ring(14, 0.3 * size, 0.3 * size, y0=-0.95 * size)]
    elif shape == "box":
        outlines = [np.array([[-1.1, -0.5], [1.1, -0.5], [1.1, 0.5], [-1.1, 0.5]]) * size]
    elif shape == "octagon":
        outlines = [ring(8, size, size, np.pi / 8)]
    elif shape == "ellipse":
        outlines = [ring(24, size, 0.6 * size)]
    elif shape == "disc":
        outlines = [ring(24, size, size)]
    else:  # diamond
        outlines = [ring(4, 0.7 * size, size)]
    rotation = np.array([[math.cos(angle), -math.sin(angle)], [math.sin(angle), math.cos(angle)]])
    return [o @ rotation.T + (cx, cy) for o in outlines]


def _rasterise(outlines: list[np.ndarray], height: int, width: int) -> tuple[np.ndarray, list[list[float]]]:
    """Mask and COCO polygons; coordinates are rounded before rasterising so the two agree exactly."""
    polygons = []
    for outline in outlines:
        clipped = np.round(np.clip(outline, 0, (width, height)), 2)
        polygons.append([float(v) for v in clipped.ravel()])
    rle = mask_utils.merge(mask_utils.frPyObjects(polygons, height, width))
    return mask_utils.decode(rle).astype(bool), polygons


def _thing(rng: np.random.Generator, category_id: int, cx: float, cy: float, size: float,
           height: int, width: int) -> _Layer:
    outlines = _shape_polygons(THING_SHAPES[category_id], cx, cy, size, rng.uniform(0, np.pi))
    mask, polygons = _rasterise(outlines, height, width)
    return _Layer(category_id, mask, polygons)


def _layers(rng: np.random.Generator, config: SynthConfig) -> list[_Layer]:
    """Things back to front (later ones occlude earlier ones), maybe a crowd among them."""
    h, w = config.height, config.width
    things = list(THING_SHAPES)
    layers = []
    for _ in range(rng.integers(1, config.max_things + 1)):
        # Log-uniform sizes give COCO's small (< 32^2), medium and large (> 96^2) objects.
        size = math.exp(rng.uniform(math.log(3), math.log(0.35 * min(h, w))))
        layers.append(_thing(rng, things[rng.integers(len(things))], rng.uniform(0, w), rng.uniform(0, h), size, h, w))
    if rng.random() < config.crowd_probability:
        category_id = CROWD_CLASSES[rng.integers(len(CROWD_CLASSES))]
        x0, y0 = rng.uniform(0, 0.7 * w), rng.uniform(0.2 * h, 0.8 * h)
        cw, ch = rng.uniform(0.15, 0.3) * w, rng.uniform(0.1, 0.2) * h
        members = [_thing(rng, category_id, x0 + rng.uniform(0, cw), y0 + rng.uniform(0, ch),
                          rng.uniform(3, 8), h, w) for _ in range(rng.integers(8, 17))]
        crowd = _Layer(category_id, np.logical_or.reduce([m.mask for m in members]), iscrowd=True)
        layers.insert(int(rng.integers(len(layers) + 1)), crowd)
    return layers


def _segment_ids(rng: np.random.Generator, n: int) -> list[int]:
    """Distinct random panoptic ids over the whole 24-bit range, as COCO's colour-based ids are."""
    ids: list[int] = []
    while len(ids) < n:
        candidate = int(rng.integers(1, 256**3))
        if candidate not in ids:
            ids.append(candidate)
    return ids


def _render(rng: np.random.Generator, sem: np.ndarray, layers: list[_Layer], void: np.ndarray | None) -> np.ndarray:
    h, w = sem.shape
    by_id = category_by_id()
    stuff = np.unique(sem)
    region = np.searchsorted(stuff, sem)
    luminance = np.zeros((h, w), np.float32)
    for k, category_id in enumerate(stuff.tolist()):
        luminance = np.where(region == k, _texture(STUFF_TEXTURES[category_id], rng, h, w), luminance)
    colours = np.asarray([by_id[c]["color"] for c in stuff.tolist()], np.float32)
    image = colours[region] + luminance[..., None]
    for layer in layers:
        colour = np.asarray(by_id[layer.category_id]["color"], np.float32) + rng.uniform(-30, 30, 3)
        ys, xs = np.nonzero(layer.mask)
        direction = rng.uniform(0, 2 * np.pi)
        shade = 0.15 * ((xs - xs.mean()) * math.cos(direction) + (ys - ys.mean()) * math.sin(direction))
        image[ys, xs] = colour + (shade + rng.normal(0, 6, len(ys)))[:, None]
    if void is not None:
        image[void] = rng.uniform(60, 200) + rng.normal(0, 25, (int(void.sum()), 1))
    image += 3 * rng.standard_normal(image.shape, dtype=np.float32)
    return np.clip(image, 0, 255).astype(np.uint8)


def _uncompressed_counts(mask: np.ndarray) -> list[int]:
    """COCO's uncompressed RLE counts (column-major runs, starting with zeros), as crowds carry."""
    flat = mask.ravel(order="F").astype(np.int8)
    changes = np.flatnonzero(np.diff(flat)) + 1
    bounds = np.concatenate([[0], changes, [flat.size]])
    runs = np.diff(bounds).tolist()
    return ([0] + runs) if flat.size and flat[0] else runs


def render_image(index: int, config: SynthConfig) -> dict:
    """One image: its JPEG and panoptic PNG bytes and its COCO records (annotation ids unset)."""
    rng = np.random.default_rng([config.seed, index])
    h, w = config.height, config.width
    image_id = config.first_image_id + index
    stem = f"{image_id:012d}"
    sem = _stuff_map(rng, h, w)
    layers = _layers(rng, config)
    void = None
    if rng.random() < config.void_probability:
        cx, cy, rx, ry = rng.uniform(0, w), rng.uniform(0, h), rng.uniform(4, w / 8), rng.uniform(4, h / 8)
        yy, xx = np.ogrid[:h, :w]
        void = ((xx - cx) / rx) ** 2 + ((yy - cy) / ry) ** 2 <= 1

    # Paint segment indices (stuff first, things back to front, VOID on top), then measure.
    stuff_ids = [int(c) for c in np.unique(sem)]
    index_map = np.searchsorted(stuff_ids, sem).astype(np.int32) + 1
    for k, layer in enumerate(layers):
        index_map[layer.mask] = len(stuff_ids) + 1 + k
    if void is not None:
        index_map[void] = 0
    n = len(stuff_ids) + len(layers)
    areas = np.bincount(index_map.ravel(), minlength=n + 1)
    category_of = [0, *stuff_ids, *(layer.category_id for layer in layers)]
    for k in range(1, n + 1):
        minimum = MIN_STUFF_AREA if k <= len(stuff_ids) else MIN_THING_AREA
        if 0 < areas[k] < minimum:
            index_map[index_map == k] = 0
    ids = _segment_ids(rng, n)
    pixels = _render(rng, sem, layers, void)
    id_map = np.asarray([0, *ids], np.uint32)[index_map]

    segments_info, instances = [], []
    for k in range(1, n + 1):
        mask = index_map == k
        if not mask.any():
            continue
        rle = Rle.from_mask(mask)
        layer = layers[k - len(stuff_ids) - 1] if k > len(stuff_ids) else None
        iscrowd = bool(layer and layer.iscrowd)
        area, bbox = rle.area(), list(rle.bbox())
        segments_info.append({"id": ids[k - 1], "category_id": category_of[k], "iscrowd": int(iscrowd),
                              "bbox": [int(v) for v in bbox], "area": area})
        if layer is None:
            continue
        if iscrowd:
            segmentation = {"size": [h, w], "counts": _uncompressed_counts(mask)}
        elif np.array_equal(mask, layer.mask):  # unoccluded: the polygons are exact
            segmentation = layer.polygons
        else:
            segmentation = rle.to_coco()
        instances.append({"image_id": image_id, "category_id": layer.category_id, "segmentation": segmentation,
                          "area": area, "bbox": bbox, "iscrowd": int(iscrowd)})

    jpeg = io.BytesIO()
    Image.fromarray(pixels).save(jpeg, format="JPEG", quality=90)
    return {
        "image": {"id": image_id, "file_name": f"{stem}.jpg", "height": h, "width": w},
        "jpeg": jpeg.getvalue(),
        "png": encode_panoptic_png(id_map),
        "panoptic": {"image_id": image_id, "file_name": f"{stem}.png", "segments_info": segments_info},
        "instances": instances,
    }


def _render_range(args: tuple[range, SynthConfig]) -> list[dict]:
    indices, config = args
    return [render_image(i, config) for i in indices]


def write_dataset(out: str, config: SynthConfig) -> dict:
    """Write a COCO-layout dataset under `out` (any fsspec URI); returns counts for a summary."""
    if config.images < 1:
        raise ValueError("a synthetic dataset needs at least one image")
    split = config.split
    chunk = 32
    chunks = [(range(i, min(i + chunk, config.images)), config) for i in range(0, config.images, chunk)]
    info = {"description": "segpipe synthetic dataset", "split": split, "seed": config.seed}
    images, panoptic, instances = [], [], []
    shard: list[tuple[str, bytes]] = []
    shards_written = 0

    def flush_shard() -> None:
        nonlocal shards_written
        if shard:
            write_tar_shard(join(out, "shards", f"{split}-{shards_written:05d}.tar"), shard)
            shards_written += 1
            shard.clear()

    executor = ProcessPoolExecutor(config.workers) if config.workers > 1 else None
    results = executor.map(_render_range, chunks) if executor else map(_render_range, chunks)
    try:
        for rendered in results:
            for item in rendered:
                image = item["image"]
                write_bytes(join(out, split, image["file_name"]), item["jpeg"])
                write_bytes(join(out, "annotations", f"panoptic_{split}", item["panoptic"]["file_name"]), item["png"])
                images.append(image)
                panoptic.append(item["panoptic"])
                for annotation in item["instances"]:
                    instances.append({"id": len(instances) + 1, **annotation})
                if config.shard_size:
                    shard.append((image["file_name"], item["jpeg"]))
                    if len(shard) == config.shard_size:
                        flush_shard()
        if config.shard_size:
            flush_shard()
    finally:
        if executor:
            executor.shutdown(cancel_futures=True)
    write_json(join(out, "annotations", f"instances_{split}.json"),
               {"info": info, "licenses": [], "images": images, "annotations": instances,
                "categories": [{k: c[k] for k in ("supercategory", "id", "name")} for c in categories(True)]})
    write_json(join(out, "annotations", f"panoptic_{split}.json"),
               {"info": info, "licenses": [], "images": images, "annotations": panoptic,
                "categories": categories()})
    return {"images": len(images), "instances": len(instances), "shards": shards_written,
            "segments": sum(len(a["segments_info"]) for a in panoptic)}


def perturb_panoptic(ids: np.ndarray, segments_info: list[dict], rng: np.random.Generator) -> tuple[np.ndarray, list[dict]]:
    """Predictions made from ground truth by the errors models make: missed and shifted segments,
    label swaps, splits, merges and spurious blobs. For tests and benchmarks of evaluation."""
    h, w = ids.shape
    pred = ids.copy()
    things = set(THING_SHAPES)
    info = {s["id"]: {"category_id": s["category_id"], "iscrowd": 0} for s in segments_info}
    next_id = int(ids.max()) + 1 if ids.size else 1

    def new_id() -> int:
        nonlocal next_id
        next_id = next_id % (256**3 - 1) + 1
        while next_id in info:
            next_id = next_id % (256**3 - 1) + 1
        return next_id

    same_class: dict[int, int] = {}
    for segment in segments_info:
        sid, mask = segment["id"], ids == segment["id"]
        roll = rng.random()
        if roll < 0.1:  # missed
            pred[mask] = 0
        elif roll < 0.2:  # label swap within things or within stuff
            pool = sorted(things if segment["category_id"] in things else STUFF_TEXTURES)
            info[sid]["category_id"] = pool[rng.integers(len(pool))]
        elif roll < 0.35:  # shifted by a few pixels
            dy, dx = rng.integers(-4, 5, 2)
            pred[mask] = 0
            pred[np.roll(mask, (int(dy), int(dx)), axis=(0, 1))] = sid
        elif roll < 0.45:  # split along a vertical line
            xs = np.nonzero(mask)[1]
            part = new_id()
            pred[mask & (np.arange(w)[None, :] > np.median(xs))] = part
            info[part] = {"category_id": segment["category_id"], "iscrowd": 0}
        elif segment["category_id"] in same_class and rng.random() < 0.3:  # merged into an earlier one
            pred[pred == sid] = same_class[segment["category_id"]]
        same_class.setdefault(segment["category_id"], sid)
    for _ in range(rng.integers(0, 3)):  # spurious blobs
        cy, cx, r = rng.uniform(0, h), rng.uniform(0, w), rng.uniform(3, min(h, w) / 6)
        yy, xx = np.ogrid[:h, :w]
        part = new_id()
        pred[(yy - cy) ** 2 + (xx - cx) ** 2 <= r * r] = part
        pool = sorted(things)
        info[part] = {"category_id": pool[rng.integers(len(pool))], "iscrowd": 0}
    present, areas = np.unique(pred, return_counts=True)
    segments = []
    for sid, area in zip(present.tolist(), areas.tolist()):
        if sid == 0:
            continue
        rle = Rle.from_mask(pred == sid)
        segments.append({"id": sid, **info[sid], "area": area, "bbox": [int(v) for v in rle.bbox()]})
    return pred, segments


def write_perturbed_panoptic(gt_json: str, out_json: str, seed: int) -> None:
    """COCO panoptic predictions (JSON + PNG folder) made by `perturb_panoptic` from a ground truth."""
    from pipeline.io.fs import read_bytes, read_json
    from pipeline.structures import decode_panoptic_png
    from pipeline.validate import default_folder

    gt = read_json(gt_json)
    gt_dir, out_dir = default_folder(gt_json), default_folder(out_json)
    annotations = []
    for index, annotation in enumerate(gt["annotations"]):
        uri = join(gt_dir, annotation["file_name"])
        ids = decode_panoptic_png(read_bytes(uri), uri)
        pred, segments = perturb_panoptic(ids, annotation["segments_info"], np.random.default_rng([seed, index]))
        write_bytes(join(out_dir, annotation["file_name"]), encode_panoptic_png(pred))
        annotations.append({"image_id": annotation["image_id"], "file_name": annotation["file_name"],
                            "segments_info": segments})
    write_json(out_json, {"images": gt["images"], "annotations": annotations, "categories": gt["categories"]})


def perturb_instances(gt: dict, rng: np.random.Generator, crowded_images: int = 2,
                      fill_to: int | None = None) -> list[dict]:
    """COCO results made from instance ground truth: shifted masks and boxes, misses, spurious
    detections, scores on a coarse grid (so ties are common), and more than 100 detections on the
    first `crowded_images` images. With `fill_to`, every image gets spurious detections up to a random
    count in [10, fill_to], as a detector's top-k output has. For tests and benchmarks of AP."""
    images = {im["id"]: im for im in gt["images"]}
    categories = [c["id"] for c in gt["categories"]]
    results = []

    def detection(image_id: int, category_id: int, mask: np.ndarray) -> dict:
        rle = Rle.from_mask(mask)
        return {"image_id": image_id, "category_id": category_id, "segmentation": rle.to_coco(),
                "bbox": list(rle.bbox()), "score": round(float(rng.random()), 1)}

    for a in gt["annotations"]:
        image = images[a["image_id"]]
        if a.get("iscrowd") or rng.random() < 0.15:
            continue
        mask = Rle.from_coco(a["segmentation"], image["height"], image["width"]).to_mask()
        dy, dx = rng.integers(-3, 4, 2)
        category = a["category_id"] if rng.random() < 0.9 else categories[rng.integers(len(categories))]
        results.append(detection(a["image_id"], category, np.roll(mask, (int(dy), int(dx)), axis=(0, 1))))
    ids = sorted(images)
    per_image = np.bincount([r["image_id"] for r in results], minlength=max(ids) + 1) if results else np.zeros(max(ids) + 1, int)
    for index, image_id in enumerate(ids):
        h, w = images[image_id]["height"], images[image_id]["width"]
        if index < crowded_images:
            extra = 120
        elif fill_to:
            extra = max(0, int(rng.integers(10, fill_to + 1)) - int(per_image[image_id]))
        else:
            extra = int(rng.integers(0, 4))
        for _ in range(extra):
            y0, x0 = int(rng.integers(0, h - 2)), int(rng.integers(0, w - 2))
            mask = np.zeros((h, w), bool)
            mask[y0:y0 + int(rng.integers(2, h // 3)), x0:x0 + int(rng.integers(2, w // 3))] = True
            results.append(detection(image_id, categories[rng.integers(len(categories))], mask))
    order = rng.permutation(len(results))  # results files are in no particular order
    return [results[i] for i in order]
