"""`segpipe review`: hand doubtful pseudo-labels to people in CVAT or Label Studio, and read their corrections back."""

from __future__ import annotations

import posixpath
from collections import Counter
from dataclasses import dataclass
from urllib.parse import unquote, urlparse
from xml.sax.saxutils import quoteattr

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
from pycocotools import mask as mask_utils

from pipeline.errors import SegpipeError
from pipeline.filtering import FilterRules, Thresholds
from pipeline.io.fs import join, read_json, url_to_fs, write_bytes, write_json
from pipeline.io.shards import list_shards, read_shard
from pipeline.io.tables import parquet_files, read_columns, read_predictions, write_predictions
from pipeline.structures import ImagePrediction, Rle, Segment

FORMATS = ("cvat", "label-studio")


class NothingToReview(SegpipeError):
    """No candidate was a near miss: nothing is worth a person's look (the engine's review stage goes on)."""

SIGNALS = {"min_score": "score", "min_stability": "stability", "min_flip_iou": "flip_iou",
           "min_class_agreement": "class_agreement"}
"""The rules whose near misses are worth a person's look: a signal a little below its threshold."""
MATCH_IOU = 0.5
"""A returned mask and an exported one are the same object when their IoU is at least this (PQ's match)."""
ACCEPT_IOU = 0.99
"""... and the object was accepted as it was when, besides the same category, their IoU is at least this."""
MODEL = "human-review"
MANIFEST = "review-export.json"


@dataclass(frozen=True)
class ExportConfig:
    """What `segpipe review export` writes.

    filtered:  a `segpipe filter` output folder; the masks come from the infer output it filtered.
    out:       the output folder (any fsspec URI).
    images:    how many images, the most doubtful first (most borderline candidates, then image id).
    margin:    a candidate is borderline when the score, stability or flip rule rejected it with the signal
               at most this far below the threshold.
    prefill:   also export the kept segments of the chosen images, so reviewers correct rather than draw.
    formats:   "cvat" (COCO instances + a labels JSON) and/or "label-studio" (tasks + a labeling config).
    only:      export these images (file names or ids) instead of choosing by doubt.
    image_url: Label Studio's `data.image` is this prefix + the frame name (where the tool serves the images).
    """

    filtered: str
    out: str
    images: int = 50
    margin: float = 0.1
    prefill: bool = True
    formats: tuple[str, ...] = FORMATS
    only: tuple[str, ...] = ()
    image_url: str = "/data/local-files/?d="


# --- export --------------------------------------------------------------------------------------


def export(config: ExportConfig) -> dict:
    """Choose the images, copy them under frame names both tools accept, write the tool files and the manifest
    that `import_review` compares the corrections with; returns the manifest."""
    if not config.formats or set(config.formats) - set(FORMATS):
        raise SegpipeError(f"--format: one or more of {', '.join(FORMATS)}")
    source = _filter_output(config.filtered)
    categories = source["categories"]
    _check_categories(categories, config.filtered)
    origin = _origins(config.filtered, source["rules"], config.margin, config.prefill)
    doubt = Counter(image for (image, _), kind in origin.items() if kind == "borderline")
    chosen = (_named_images(config.only, source["pred"]) if config.only
              else sorted(doubt, key=lambda image: (-doubt[image], image))[:config.images])
    if not chosen:
        raise NothingToReview(f"{config.filtered}: no candidate was rejected within --margin {config.margin} of its "
                           "threshold; widen --margin or name images with --image")
    predictions = read_predictions(parquet_files(join(source["pred"], "predictions")), chosen)
    predictions.sort(key=lambda p: (-doubt[p.image_id], chosen.index(p.image_id)))
    frames = frame_names(predictions)
    images, empty = [], 0
    for prediction in predictions:
        segments = [(s, origin[(prediction.image_id, s.id)]) for s in prediction.segments
                    if (prediction.image_id, s.id) in origin]
        kept = [(s, kind) for s, kind in segments if s.rle.area() > 0]  # CVAT fails on an empty mask
        empty += len(segments) - len(kept)
        images.append({"image_id": prediction.image_id, "file_name": prediction.file_name,
                       "frame": frames[prediction.image_id], "height": prediction.height, "width": prediction.width,
                       "doubt": doubt[prediction.image_id],
                       "segments": [{"segment_id": s.id, "category_id": s.category_id, "score": s.score,
                                     "origin": kind, "rle": s.rle.counts} for s, kind in kept]})
    _copy_images(source["images"], images, config.out)
    exported = Counter(s["origin"] for image in images for s in image["segments"])
    manifest = {"filtered": config.filtered, "predictions": source["pred"], "images_uri": source["images"],
                "model": source["model"], "margin": config.margin, "prefill": config.prefill,
                "formats": list(config.formats), "categories": categories,
                "masks": {"borderline": exported["borderline"], "kept": exported["kept"], "empty_left_out": empty},
                "images": images}
    write_bytes(join(config.out, "images.txt"), "".join(f"{im['frame']}\n" for im in images).encode())
    if "cvat" in config.formats:
        write_json(join(config.out, "cvat", "instances.json"), cvat_coco(images, categories))
        write_json(join(config.out, "cvat", "labels.json"), cvat_labels(categories))
    if "label-studio" in config.formats:
        write_json(join(config.out, "label-studio", "tasks.json"),
                   label_studio_tasks(images, categories, config.image_url, source["model"]))
        write_bytes(join(config.out, "label-studio", "config.xml"), label_studio_config(categories).encode())
    write_json(join(config.out, MANIFEST), manifest)  # last: its presence means the export is whole
    return manifest


def _filter_output(filtered: str) -> dict:
    fs, path = url_to_fs(join(filtered, "filter.json"))
    if not fs.exists(path):
        raise SegpipeError(f"{filtered}: not a `segpipe filter` output folder (no filter.json)")
    summary = read_json(join(filtered, "filter.json"))
    run = read_json(join(filtered, "run.json"))
    saved = summary["rules"]
    rules = FilterRules(Thresholds(**saved["thresholds"]),
                        {int(k): Thresholds(**v) for k, v in saved["per_class"].items()}, saved["duplicate_iou"])
    return {"pred": summary["source"], "images": run["input"], "model": run.get("model", ""), "rules": rules,
            "categories": read_json(join(filtered, "categories.json"))}


def _origins(filtered: str, rules: FilterRules, margin: float, prefill: bool) -> dict[tuple[int, int], str]:
    """(image id, segment id) -> "borderline" or "kept" (with `prefill`), for the candidates worth exporting."""
    columns = ["image_id", "segment_id", "category_id", "score", "stability", "flip_iou", "kept", "rejected_by"]
    origin = {}
    for row in (row for f in parquet_files(join(filtered, "decisions"))
                for row in read_columns(f, columns + _since_version_2(f)).to_pylist()):
        if row["kept"] and prefill:
            origin[(row["image_id"], row["segment_id"])] = "kept"
        elif not row["kept"] and _borderline(row, rules, margin):
            origin[(row["image_id"], row["segment_id"])] = "borderline"
    return origin


def _check_categories(categories: list[dict], where: str) -> None:
    """Both tools map labels by name, and CVAT reads category id 0 as 'no label'."""
    names = Counter(c["name"] for c in categories)
    twice = sorted(name for name, n in names.items() if n > 1)
    if twice:
        raise SegpipeError(f"{where}: category name {twice[0]!r} is used twice; CVAT and Label Studio match labels "
                           "by name")
    if any(c["id"] == 0 for c in categories):
        raise SegpipeError(f"{where}: category id 0; CVAT's COCO importer reads it as 'no label'")


def _since_version_2(uri: str) -> list[str]:
    """class_agreement, where the decisions table has it (version 2 on)."""
    fs, path = url_to_fs(uri)
    return ["class_agreement"] if "class_agreement" in pq.read_schema(path, filesystem=fs).names else []


def _borderline(row: dict, rules: FilterRules, margin: float) -> bool:
    """Rejected by a signal rule, the signal within `margin` below that rule's threshold for the class."""
    signal = SIGNALS.get(row["rejected_by"])
    if signal is None or row.get(signal) is None:
        return False
    threshold = getattr(rules.of(row["category_id"]), row["rejected_by"])
    return threshold - margin <= row[signal] < threshold


def _named_images(names: tuple[str, ...], pred: str) -> list[int]:
    """The image ids of `names` (file names or ids) among the images the predictions table holds."""
    table = pa.concat_tables(read_columns(f, ["image_id", "file_name"])
                             for f in parquet_files(join(pred, "predictions"))).to_pydict()
    by_name = dict(zip(table["file_name"], table["image_id"]))
    ids = set(table["image_id"])
    found = []
    for name in names:
        image_id = by_name.get(name, int(name) if name.isdigit() and int(name) in ids else None)
        if image_id is None:
            raise SegpipeError(f"--image {name!r}: not in the pool (no candidate of {pred} is on such an image)")
        found.append(image_id)
    return list(dict.fromkeys(found))


def frame_names(predictions: list[ImagePrediction]) -> dict[int, str]:
    """Each image's name in the review folder: its base name, made safe for CVAT's frame matching.

    CVAT matches an annotation to a frame by the name without its last extension, so a name with a second dot
    (`a.jpg.png`, `b.v2.jpg`) does not match and two names with one stem (`x.jpg`, `x.png`) collide: inner dots
    become '_', and names that still collide (case aside) get `-IMAGE_ID` before the extension.
    """
    frames = {}
    for p in predictions:
        stem, extension = posixpath.splitext(posixpath.basename(p.file_name))
        frames[p.image_id] = (stem.replace(".", "_"), extension)
    stems = Counter(stem.lower() for stem, _ in frames.values())
    names = {image_id: f"{stem}-{image_id}{ext}" if stems[stem.lower()] > 1 else stem + ext
             for image_id, (stem, ext) in frames.items()}
    if len({posixpath.splitext(n)[0].lower() for n in names.values()}) < len(names):
        raise SegpipeError("two images still share a frame name after renaming; rename the images")
    return names


def _copy_images(uri: str, images: list[dict], out: str) -> None:
    """The chosen images under their frame names in OUT/images/, the folder to upload to the tool."""
    wanted = {im["file_name"]: im["frame"] for im in images}
    copied = set()
    for shard in list_shards(uri):
        if shard.kind == "folder":
            shard = type(shard)("folder", shard.uri, tuple(m for m in shard.members if m in wanted))
            if not shard.members:
                continue
        for record in read_shard(shard):
            if record.key in wanted:
                write_bytes(join(out, "images", wanted[record.key]), record.data)
                copied.add(record.key)
    missing = sorted(wanted.keys() - copied)
    if missing:
        raise SegpipeError(f"{uri}: image {missing[0]!r} is not there" + (f" (nor {len(missing) - 1} more)"
                                                                           if len(missing) > 1 else ""))


# --- the tools' files -----------------------------------------------------------------------------


def cvat_coco(images: list[dict], categories: list[dict]) -> dict:
    """COCO instances for CVAT's COCO 1.0 importer: every category (labels are matched by name), file names
    equal to the frame names, masks as compressed RLE with iscrowd 1 (CVAT's own export of a mask, which its
    importer reads back as a mask, pixel for pixel; polygons would be redrawn), no empty mask."""
    annotations = []
    for image in images:
        for s in image["segments"]:
            rle = Rle(s["rle"], image["height"], image["width"])
            annotations.append({"id": len(annotations) + 1, "image_id": image["image_id"],
                                "category_id": s["category_id"], "segmentation": rle.to_coco(), "area": rle.area(),
                                "bbox": list(rle.bbox()), "iscrowd": 1})
    return {"info": {"description": "segpipe review export"}, "licenses": [],
            "categories": [{"id": c["id"], "name": c["name"], "supercategory": c.get("supercategory", "")}
                           for c in categories],
            "images": [{"id": im["image_id"], "file_name": im["frame"], "height": im["height"], "width": im["width"]}
                       for im in images],
            "annotations": annotations}


def cvat_labels(categories: list[dict]) -> list[dict]:
    """The labels of a CVAT task (its 'Raw' label editor, or the API's `labels`), one per category."""
    return [{"name": c["name"], "type": "any", "attributes": [],
             **({"color": "#{:02x}{:02x}{:02x}".format(*c["color"])} if c.get("color") else {})} for c in categories]


def label_studio_config(categories: list[dict]) -> str:
    """A labeling config whose BrushLabels carry every category (a task's labels must exist in it)."""
    labels = "".join(f"\n    <Label value={quoteattr(c['name'])}/>" for c in categories)
    return (f'<View>\n  <Image name="image" value="$image" zoom="true"/>\n'
            f'  <BrushLabels name="label" toName="image">{labels}\n  </BrushLabels>\n'
            f'  <PolygonLabels name="polygon" toName="image">{labels}\n  </PolygonLabels>\n</View>\n')


def label_studio_tasks(images: list[dict], categories: list[dict], image_url: str, model: str) -> list[dict]:
    """Label Studio tasks, most doubtful first, each with one prediction holding the exported masks as brush
    labels in Label Studio's RLE; a result's score is the segment's, the prediction's (what the task list sorts
    by) the mean over its masks."""
    names = {c["id"]: c["name"] for c in categories}
    tasks = []
    for image in images:
        results = []
        for s in image["segments"]:
            mask = Rle(s["rle"], image["height"], image["width"]).to_mask()
            results.append({"id": f"segpipe-{s['segment_id']}", "from_name": "label", "to_name": "image",
                            "type": "brushlabels", "original_width": image["width"],
                            "original_height": image["height"], "image_rotation": 0, "score": s["score"],
                            "value": {"format": "rle", "rle": ls_rle_encode(mask),
                                      "brushlabels": [names[s["category_id"]]]}})
        score = float(np.mean([s["score"] for s in image["segments"]])) if results else 0.0
        tasks.append({"data": {"image": image_url + image["frame"], "frame": image["frame"],
                               "image_id": image["image_id"], "doubt": image["doubt"]},
                      "predictions": [{"model_version": model or "segpipe", "score": score, "result": results}]})
    return tasks


LS_RUN_BITS = (3, 4, 8, 16)
"""Bits of the four run-length sizes in the header (Label Studio's converter writes these)."""


def ls_rle_encode(mask: np.ndarray) -> list[int]:
    """A mask in Label Studio's brush RLE: the image's RGBA bytes, row-major, 255 inside and 0 outside, packed
    by thi.ng's rle-pack. The bit stream: 32 bits value count, 5 bits word size - 1, four 4-bit run-length
    sizes - 1, then runs: a 1 bit (a repeat), 2 bits choosing the size, the length - 1 in that many bits, the
    8-bit value. Runs longer than 2^16 are split."""
    flat = np.asarray(mask, bool).reshape(-1)
    starts = np.concatenate([[0], np.flatnonzero(flat[1:] != flat[:-1]) + 1])
    lengths = 4 * np.diff(np.concatenate([starts, [flat.size]]))  # four bytes a pixel
    values = np.where(flat[starts], 255, 0)
    pieces = -(-lengths // 2**16)
    run_values = np.repeat(values, pieces)
    run_lengths = np.full(pieces.sum(), 2**16)
    run_lengths[np.cumsum(pieces) - 1] = lengths - 2**16 * (pieces - 1)
    size = np.searchsorted(np.array([2**b for b in LS_RUN_BITS]), run_lengths)  # smallest size holding length-1
    fields = np.stack([np.ones_like(size), size, run_lengths - 1, run_values], 1).reshape(-1)
    widths = np.stack([np.ones_like(size), np.full_like(size, 2), np.array(LS_RUN_BITS)[size],
                       np.full_like(size, 8)], 1).reshape(-1)
    header = [(4 * flat.size, 32), (7, 5), *((b - 1, 4) for b in LS_RUN_BITS)]
    fields = np.concatenate([[v for v, _ in header], fields]).astype(np.int64)
    widths = np.concatenate([[w for _, w in header], widths]).astype(np.int64)
    field = np.repeat(np.arange(fields.size), widths)
    shift = np.cumsum(widths)[field] - 1 - np.arange(field.size)  # bit k of a field, most significant first
    return np.packbits((fields[field] >> shift) & 1).tolist()


def ls_rle_decode(data: list[int], height: int, width: int) -> np.ndarray:
    """A Label Studio brush RLE back to a mask: the alpha byte of each pixel, at least 128. Reads any word and
    run-length sizes and literal runs, as Label Studio's own editor may write them."""
    bits = np.unpackbits(np.asarray(data, np.uint8))
    position = 0

    def read(n: int, count: int = 1) -> np.ndarray:
        nonlocal position
        chunk = bits[position:position + n * count]
        position += n * count
        if chunk.size < n * count:
            raise ValueError("the RLE ends early")
        return chunk.reshape(count, n).astype(np.int64) @ (1 << np.arange(n - 1, -1, -1, dtype=np.int64))

    total, word = int(read(32)[0]), int(read(5)[0]) + 1
    sizes = (read(4, 4) + 1).tolist()
    if total != 4 * height * width:
        raise ValueError(f"it holds {total} values, not the 4 x {height} x {width} of an RGBA image")
    out = np.zeros(total, np.int64)
    i = 0
    while i < total:
        repeat = int(read(1)[0])
        j = min(total, i + 1 + int(read(sizes[int(read(2)[0])])[0]))
        out[i:j] = read(word)[0] if repeat else read(word, j - i)
        i = j
    return out.reshape(height, width, 4)[..., 3] >= 128


# --- import --------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Returned:
    """One mask of the corrected file, mapped onto the export's image and category ids."""

    category_id: int
    rle: Rle


def import_review(exported: str, corrected: str, out: str) -> dict:
    """Read the corrected file (CVAT's COCO export or Label Studio's JSON export) against the export's manifest,
    count what people accepted, changed, deleted and added, and write OUT as a labels folder `segpipe train
    --train OUT` (or `--pseudo OUT`) reads, with OUT/review.json; returns what review.json holds."""
    manifest = read_json(join(exported, MANIFEST))
    data = read_json(corrected)
    if isinstance(data, dict):
        returned, reviewed = _from_coco(corrected, manifest), None
    elif isinstance(data, list):
        returned, reviewed = _from_label_studio(corrected, data, manifest)
    else:
        raise SegpipeError(f"{corrected}: neither a COCO file (an object) nor a Label Studio export (a list)")
    counts = {origin: dict.fromkeys(("accepted", "changed", "deleted"), 0) for origin in ("kept", "borderline")}
    added, labels = 0, []
    for image in manifest["images"]:
        if reviewed is not None and image["image_id"] not in reviewed:
            continue  # a Label Studio task nobody annotated: nothing was decided
        masks = returned.get(image["image_id"], [])
        for outcome, origin in match(image, masks):
            if origin is None:
                added += 1
            else:
                counts[origin][outcome] += 1
        segments = tuple(Segment.from_rle(k + 1, r.category_id, r.rle) for k, r in enumerate(masks))
        if segments:
            labels.append(ImagePrediction(image["image_id"], image["file_name"], image["height"], image["width"],
                                          segments))
    labels.sort(key=lambda p: p.image_id)
    write_predictions(join(out, "predictions", "part-00000.parquet"), labels, "review", MODEL)
    write_json(join(out, "categories.json"), manifest["categories"])
    summary = _summary(counts, added, exported, corrected,
                       len(manifest["images"]) if reviewed is None else len(reviewed))
    write_json(join(out, "review.json"), summary)
    # Last: run.json makes OUT a dataset `segpipe train` reads (the images are the pool's).
    write_json(join(out, "run.json"), {"input": manifest["images_uri"], "run_id": "review", "model": MODEL,
                                       "reviewed_from": corrected, "export": exported})
    return summary


def match(image: dict, masks: list[Returned]) -> list[tuple[str, str | None]]:
    """(outcome, origin of the exported mask or None) for each exported and each returned mask of one image.

    Pairs are made greedily by mask IoU, highest first (ties: same category first, then file order), one to
    one, among pairs with IoU >= MATCH_IOU. A pair is `accepted` when it keeps the category and IoU >=
    ACCEPT_IOU, else `changed` (moved, reshaped or relabelled). An exported mask left unpaired was `deleted`,
    a returned one `added`."""
    exported = image["segments"]
    if not exported or not masks:
        return [("deleted", s["origin"]) for s in exported] + [("added", None)] * len(masks)
    rles = [Rle(s["rle"], image["height"], image["width"]).encoded() for s in exported]
    iou = np.asarray(mask_utils.iou(rles, [m.rle.encoded() for m in masks], [0] * len(masks)))
    iou = iou.reshape(len(exported), len(masks))
    same = np.array([[s["category_id"] == m.category_id for m in masks] for s in exported])
    pairs = sorted(((-iou[e, r], not same[e, r], e, r) for e in range(len(exported)) for r in range(len(masks))
                    if iou[e, r] >= MATCH_IOU))
    used_e, used_r, outcomes = set(), set(), []
    for _, _, e, r in pairs:
        if e in used_e or r in used_r:
            continue
        used_e.add(e)
        used_r.add(r)
        outcomes.append(("accepted" if same[e, r] and iou[e, r] >= ACCEPT_IOU else "changed", exported[e]["origin"]))
    outcomes += [("deleted", exported[e]["origin"]) for e in range(len(exported)) if e not in used_e]
    return outcomes + [("added", None)] * (len(masks) - len(used_r))


def _summary(counts: dict, added: int, exported: str, corrected: str, images: int) -> dict:
    total = {k: sum(c[k] for c in counts.values()) for k in ("accepted", "changed", "deleted")}
    shown = sum(total.values())
    returned = total["accepted"] + total["changed"] + added
    return {"export": exported, "corrected": corrected, "images": images, "exported_masks": shown,
            "returned_masks": returned, **total, "added": added, "by_origin": counts,
            "ratios": {**{k: v / shown if shown else None for k, v in total.items()},
                       "added": added / returned if returned else None}}


def _by_name(manifest: dict) -> tuple[dict[str, dict], dict[str, int]]:
    frames = {im["frame"]: im for im in manifest["images"]}
    return frames, {c["name"]: c["id"] for c in manifest["categories"]}


def _image(frames: dict[str, dict], name: str, file: str) -> dict:
    frame = posixpath.basename(name)
    if frame not in frames:
        raise SegpipeError(f"{file}: image {name!r} is not in the export (its images are listed in images.txt)")
    return frames[frame]


def _category(categories: dict[str, int], name: str, file: str) -> int:
    if name not in categories:
        raise SegpipeError(f"{file}: category {name!r} is not one of the export's categories "
                           f"({', '.join(sorted(categories))})")
    return categories[name]


def _from_coco(corrected: str, manifest: dict) -> dict[int, list[Returned]]:
    """CVAT's COCO export: checked with `segpipe validate`; images by file name, categories by name (CVAT
    numbers both its own way); RLE or polygons."""
    from pipeline.validate import read_coco, validate

    report = validate(corrected)
    if report.problems:
        more = len(report.problems) - 1
        raise SegpipeError(f"{report.problems[0]}" + (f" (and {more} more problems)" if more else ""))
    coco, kind = read_coco(corrected)
    if kind != "instances":
        raise SegpipeError(f"{corrected}: COCO {kind}; export COCO 1.0 (instances) from CVAT")
    frames, names = _by_name(manifest)
    used = {a["category_id"] for a in coco["annotations"]}  # a task may hold labels nobody used
    category = {c["id"]: _category(names, c["name"], corrected) for c in coco["categories"] if c["id"] in used}
    images = {}
    for im in coco["images"]:
        image = _image(frames, im["file_name"], corrected)
        if (im["height"], im["width"]) != (image["height"], image["width"]):
            raise SegpipeError(f"{corrected}: image {im['file_name']!r} is {im['height']}x{im['width']}, the export's "
                               f"is {image['height']}x{image['width']}")
        images[im["id"]] = image
    returned: dict[int, list[Returned]] = {image["image_id"]: [] for image in images.values()}
    for a in coco["annotations"]:
        image = images[a["image_id"]]
        rle = Rle.from_coco(a["segmentation"], image["height"], image["width"])
        if rle.area():
            returned[image["image_id"]].append(Returned(category[a["category_id"]], rle))
    return returned


def _from_label_studio(corrected: str, tasks: list, manifest: dict) -> tuple[dict[int, list[Returned]], set[int]]:
    """Label Studio's JSON export: each task's latest annotation that was not cancelled (a task without one was
    not reviewed); brush labels (RLE) and polygon labels (points in percent of the image)."""
    frames, names = _by_name(manifest)
    returned: dict[int, list[Returned]] = {}
    for task in tasks:
        data = task.get("data", {}) if isinstance(task, dict) else {}
        name = data.get("frame") or unquote(urlparse(str(data.get("image", ""))).path)
        image = _image(frames, name, corrected)
        annotations = [a for a in task.get("annotations", []) if not a.get("was_cancelled")]
        if not annotations:
            continue
        latest = max(annotations, key=lambda a: (a.get("updated_at") or a.get("created_at") or "", a.get("id", 0)))
        masks = returned.setdefault(image["image_id"], [])
        for result in latest.get("result", []):
            mask = _ls_mask(result, image, corrected)
            if mask is not None and mask[1].area():
                masks.append(Returned(_category(names, mask[0], corrected), mask[1]))
    return returned, set(returned)


def _ls_mask(result: dict, image: dict, file: str) -> tuple[str, Rle] | None:
    kind, value = result.get("type"), result.get("value", {})
    height, width = image["height"], image["width"]
    where = f"{file}: image {image['frame']!r}: result {result.get('id')!r}"
    if kind not in ("brushlabels", "polygonlabels"):
        return None
    labels = value.get(kind) or []
    if not labels:
        raise SegpipeError(f"{where}: no label")
    if (result.get("original_height", height), result.get("original_width", width)) != (height, width):
        raise SegpipeError(f"{where}: drawn on a {result['original_height']}x{result['original_width']} image, the "
                           f"export's is {height}x{width}")
    if kind == "polygonlabels":
        corners = value.get("points")
        if not isinstance(corners, list) or len(corners) < 3:
            raise SegpipeError(f"{where}: a polygon needs at least 3 points")
        points = [v for x, y in corners for v in (x * width / 100, y * height / 100)]
        return labels[0], Rle.from_coco([points], height, width)
    try:
        return labels[0], Rle.from_mask(ls_rle_decode(value["rle"], height, width))
    except (KeyError, ValueError) as error:
        raise SegpipeError(f"{where}: not a brush RLE ({error})") from None
