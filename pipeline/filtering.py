"""`segpipe filter`: which predicted segments become pseudo-labels, decided by rules on their quality signals.

Reads a `segpipe infer` output folder part by part (memory holds one part) and writes, for each part:

    OUT/decisions/part-NNNNN.parquet    every candidate, its signals, kept or not, and the first rule that
                                        rejected it (schemas/decisions.json), so any mask can be audited
    OUT/predictions/part-NNNNN.parquet  the kept segments, as a predictions table

and OUT/categories.json, OUT/run.json (the images' location, so `segpipe train --train OUT` reads the kept
segments as labels: pixels of rejected segments are left unlabelled, ignored by the loss, never taught as
background) and OUT/filter.json (the rules and how many each rejected).

Rules, in this order (the first that fails is recorded): score, stability, flip agreement, class agreement
(proposals given a class by `segpipe classify`), area (min, then max), then duplicates: within an image, candidates that passed are taken by score and one whose mask
overlaps a kept one by more than `duplicate_iou` (mask IoU, any category) is rejected as its duplicate.
"""

from __future__ import annotations

import json
import math
from dataclasses import asdict, dataclass, field, fields, replace

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from pipeline.errors import SegpipeError
from pipeline.io.fs import atomic_write, join, read_bytes, read_json, url_to_fs, write_json
from pipeline.io.tables import parquet_files, read_predictions
from pipeline.schemas import arrow_schema
from pipeline.structures import ImagePrediction, Segment, predictions_from_arrow, predictions_to_arrow

RULES = ("min_score", "min_stability", "min_flip_iou", "min_class_agreement", "min_area", "max_area", "duplicate")
DECISIONS_SCHEMA = arrow_schema("decisions")


@dataclass(frozen=True)
class Thresholds:
    """One set of rule thresholds; None switches a rule off."""

    min_score: float | None = None
    min_stability: float | None = None
    min_flip_iou: float | None = None
    min_area: int | None = None
    max_area: int | None = None
    min_class_agreement: float | None = None
    """The share of a classified proposal's pixels the panoptic model gives its class (`segpipe classify`)."""


@dataclass(frozen=True)
class FilterRules:
    """The rules: thresholds for every class, per-class overrides (category id -> the thresholds that differ),
    and the duplicate IoU (None: no duplicate suppression)."""

    thresholds: Thresholds = Thresholds()
    per_class: dict[int, Thresholds] = field(default_factory=dict)
    duplicate_iou: float | None = 0.7

    def of(self, category_id: int) -> Thresholds:
        return self.per_class.get(category_id, self.thresholds)

    @classmethod
    def parse_per_class(cls, text: str, base: Thresholds) -> dict[int, Thresholds]:
        """`{"CATEGORY_ID": {"min_score": 0.5, ...}, ...}` (JSON) over `base`; one line for anything else."""
        try:
            data = json.loads(text)
        except json.JSONDecodeError as error:
            raise SegpipeError(f"--class-rules: not JSON ({error})") from None
        names = {f.name for f in fields(Thresholds)}
        if not isinstance(data, dict):
            raise SegpipeError("--class-rules: expected an object of category id -> rules")
        out = {}
        for key, rules in data.items():
            if not key.lstrip("-").isdigit():
                raise SegpipeError(f"--class-rules: {key!r} is not a category id")
            if not isinstance(rules, dict) or set(rules) - names:
                unknown = sorted(set(rules) - names) if isinstance(rules, dict) else []
                raise SegpipeError(f"--class-rules: category {key}: " + (f"unknown rule {unknown[0]!r} (rules: "
                                   f"{', '.join(sorted(names))})" if unknown else "expected an object of rules"))
            for name, value in rules.items():
                if value is not None and (isinstance(value, bool) or not isinstance(value, (int, float))):
                    raise SegpipeError(f"--class-rules: category {key}: {name} must be a number or null")
            out[int(key)] = replace(base, **rules)
        return out


def failures(segment: Segment, t: Thresholds) -> list[str]:
    """The threshold rules a segment fails, in rule order; a rule needing a signal the segment lacks fails."""
    found = [name for name, value, least in (
        ("min_score", segment.score, t.min_score), ("min_stability", segment.stability, t.min_stability),
        ("min_flip_iou", segment.flip_iou, t.min_flip_iou),
        ("min_class_agreement", segment.class_agreement, t.min_class_agreement), ("min_area", segment.area, t.min_area))
        if least is not None and (value is None or value < least)]
    return found + (["max_area"] if t.max_area is not None and segment.area > t.max_area else [])


def decide(prediction: ImagePrediction, rules: FilterRules) -> list[tuple[str | None, int | None]]:
    """For each segment of one image: (the rule that rejected it, or None if kept; the segment it duplicates)."""
    verdicts: list[tuple[str | None, int | None]] = [
        (next(iter(failures(s, rules.of(s.category_id))), None), None) for s in prediction.segments]
    if rules.duplicate_iou is not None:
        _duplicates(prediction, verdicts, rules.duplicate_iou)
    return verdicts


def _duplicates(prediction: ImagePrediction, verdicts: list, threshold: float) -> None:
    from pycocotools import mask as mask_utils

    alive = [k for k, (failed, _) in enumerate(verdicts) if failed is None]
    if len(alive) < 2:
        return
    order = sorted(alive, key=lambda k: -prediction.segments[k].score)  # stable: ties keep table order
    rles = [prediction.segments[k].rle.encoded() for k in order]
    iou = mask_utils.iou(rles, rles, [0] * len(rles))
    kept: list[int] = []
    for i, k in enumerate(order):
        twin = next((j for j in kept if iou[i, j] > threshold), None)
        if twin is None:
            kept.append(i)
        else:
            verdicts[k] = ("duplicate", prediction.segments[order[twin]].id)


def run(pred: str, out: str, rules: FilterRules, audit: str | None = None,
        target: tuple[str, float] | None = None) -> dict:
    """Filter the predictions of the infer output folder `pred` into `out`; returns what filter.json holds.
    With `audit` (COCO panoptic or instances labels of a sample of the images), it also says how precise
    each rule and the kept set are there (`audit_report`), and with `target` (a rule of TUNABLE, a precision)
    it first chooses that rule's threshold per class from the audit (`tune`)."""
    source = read_infer_output(pred)
    truth = read_audit(audit) if audit else None
    tuned = None
    if target is not None:
        if truth is None:
            raise SegpipeError("--target-precision: needs --audit (labels to measure precision on)")
        sample = read_predictions(parquet_files(join(pred, "predictions")), sorted(truth))
        rules, tuned = tune(truth, sample, rules, *target)
    audited: list[tuple[ImagePrediction, list]] = []
    previous = join(out, "filter.json")
    if url_to_fs(previous)[0].exists(url_to_fs(previous)[1]):
        earlier = read_json(previous)
        if (earlier.get("source"), earlier.get("rules")) != (pred, _rules_json(rules)):
            raise SegpipeError(f"{out}: holds the decisions of other predictions or rules; use another --out, or "
                               "delete it to start over")
    files = parquet_files(join(pred, "predictions"))
    for rule, column, how in (("min_flip_iou", "flip_iou", "label with `segpipe infer --flip-check`"),
                              ("min_class_agreement", "class_agreement", "give proposals a class with `segpipe classify`")):
        if any(getattr(t, rule) is not None for t in (rules.thresholds, *rules.per_class.values())):
            _require_signal(files, pred, rule, column, how)
    counts = {"candidates": 0, "kept": 0, "rejected": dict.fromkeys(RULES, 0)}
    for index, uri in enumerate(files):
        predictions = predictions_from_arrow(pq.read_table(url_to_fs(uri)[1], filesystem=url_to_fs(uri)[0]))
        rows: dict[str, list] = {name: [] for name in DECISIONS_SCHEMA.names}
        kept_predictions = []
        for prediction in predictions:
            verdicts = decide(prediction, rules)
            if truth is not None and prediction.image_id in truth:
                audited.append((prediction, verdicts))
            for s, (failed, twin) in zip(prediction.segments, verdicts):
                for name, value in (("image_id", prediction.image_id), ("segment_id", s.id),
                                    ("category_id", s.category_id), ("score", s.score), ("stability", s.stability),
                                    ("flip_iou", s.flip_iou), ("class_agreement", s.class_agreement),
                                    ("area", s.area), ("kept", failed is None),
                                    ("rejected_by", failed), ("duplicate_of", twin)):
                    rows[name].append(value)
                counts["candidates"] += 1
                if failed is None:
                    counts["kept"] += 1
                else:
                    counts["rejected"][failed] += 1
            kept = tuple(s for s, (failed, _) in zip(prediction.segments, verdicts) if failed is None)
            if kept:
                kept_predictions.append(replace(prediction, segments=kept))
        _write(join(out, "decisions", f"part-{index:05d}.parquet"), pa.Table.from_pydict(rows, schema=DECISIONS_SCHEMA))
        run_id = source["run"].get("run_id", "filter")
        _write(join(out, "predictions", f"part-{index:05d}.parquet"),
               predictions_to_arrow(kept_predictions, run_id, source["run"].get("model", "")))
    write_json(join(out, "categories.json"), source["categories"])
    summary = {"source": pred, "rules": _rules_json(rules), **counts, **({"tuned": tuned} if tuned else {})}
    if truth is not None:
        summary["audit"] = {"labels": audit, **audit_report(truth, audited, rules, source["categories"])}
    write_json(join(out, "filter.json"), summary)
    # Last: run.json makes OUT a dataset `segpipe train` reads (its images are the source run's input).
    write_json(join(out, "run.json"), {**source["run"], "filter": summary["rules"], "filtered_from": pred})
    return summary


# --- the audit: precision on a labelled sample (Segment Anything's check of its data engine) -------------

IOU_MATCH = 0.5


@dataclass(frozen=True)
class AuditImage:
    """The labels of one audited image: its non-crowd segments as COCO RLE, and its panoptic map if it has one."""

    height: int
    width: int
    categories: tuple[int, ...]
    rles: tuple[dict, ...]
    crowd: tuple[bool, ...]
    panoptic: tuple[np.ndarray, list[dict]] | None = None


def read_audit(uri: str) -> dict[int, AuditImage]:
    """COCO panoptic (JSON + PNGs beside it) or instances labels of the audited images, by image id."""
    from pycocotools import mask as mask_utils

    from pipeline.structures import Rle, decode_panoptic_png

    coco = read_json(uri)
    if not isinstance(coco, dict) or not all(isinstance(coco.get(k), list) for k in ("images", "annotations")):
        raise SegpipeError(f"{uri}: not a COCO file (needs 'images' and 'annotations')")
    images = {im["id"]: im for im in coco["images"]}
    found: dict[int, AuditImage] = {}
    if coco["annotations"] and "segments_info" in coco["annotations"][0]:
        folder = uri[: -len(".json")] if uri.endswith(".json") else uri
        for annotation in coco["annotations"]:
            ids = decode_panoptic_png(read_bytes(join(folder, annotation["file_name"])), join(folder, annotation["file_name"]))
            infos = [{**s, "area": s.get("area", int((ids == s["id"]).sum()))} for s in annotation["segments_info"]]
            rles = tuple(mask_utils.encode(np.asfortranarray((ids == s["id"]).astype(np.uint8))) for s in infos)
            found[annotation["image_id"]] = AuditImage(*ids.shape, tuple(s["category_id"] for s in infos), rles,
                                                       tuple(bool(s.get("iscrowd", 0)) for s in infos), (ids, infos))
        return found
    per_image: dict[int, list[dict]] = {i: [] for i in images}
    for annotation in coco["annotations"]:
        per_image.setdefault(annotation["image_id"], []).append(annotation)
    for image_id, annotations in per_image.items():
        height, width = images[image_id]["height"], images[image_id]["width"]
        rles = tuple(Rle.from_coco(a["segmentation"], height, width).encoded() for a in annotations)
        found[image_id] = AuditImage(height, width, tuple(a["category_id"] for a in annotations), rles,
                                     tuple(bool(a.get("iscrowd", 0)) for a in annotations))
    return found


def _hits(prediction: ImagePrediction, label: AuditImage) -> np.ndarray:
    """Candidates x labelled non-crowd segments: same category and mask IoU above IOU_MATCH."""
    from pycocotools import mask as mask_utils

    own = [s.rle.encoded() for s in prediction.segments]
    usable = [k for k, crowd in enumerate(label.crowd) if not crowd]
    iou = (mask_utils.iou(own, [label.rles[k] for k in usable], [0] * len(usable)) if own and usable
           else np.zeros((len(own), len(usable))))
    iou = np.asarray(iou).reshape(len(own), len(usable))
    same = (np.array([s.category_id for s in prediction.segments])[:, None]
            == np.array([label.categories[k] for k in usable])[None, :])
    return (iou > IOU_MATCH) & same


TUNABLE = ("min_score", "min_stability", "min_flip_iou", "min_class_agreement")


def tune(truth: dict[int, AuditImage], audited: list[ImagePrediction], rules: FilterRules, rule: str,
         target: float) -> tuple[FilterRules, dict]:
    """Per class, the loosest `rule` threshold whose audit precision reaches `target`: among the class's audited
    candidates that pass its other threshold rules, the lowest signal value v such that those at v or above
    are correct (match a label, see `audit_report`) at least `target` of the time. A class that never reaches
    it gets a threshold above all its candidates (none kept); a class the audit does not see keeps its rules."""
    values: dict[int, list[tuple[float, bool]]] = {}
    field = {"min_score": "score", "min_stability": "stability", "min_flip_iou": "flip_iou",
             "min_class_agreement": "class_agreement"}[rule]
    for prediction in audited:
        correct = _hits(prediction, truth[prediction.image_id]).any(axis=1)
        for s, ok in zip(prediction.segments, correct):
            value = getattr(s, field)
            others = replace(rules.of(s.category_id), **{rule: None})
            if value is not None and not failures(s, others):
                values.setdefault(s.category_id, []).append((float(value), bool(ok)))
    per_class, chosen = dict(rules.per_class), {}
    for category, pairs in sorted(values.items()):
        pairs.sort(key=lambda pair: -pair[0])
        hits, best = 0, None
        for n, (value, ok) in enumerate(pairs, 1):
            hits += ok
            last = n == len(pairs) or pairs[n][0] != value  # thresholds sit between distinct values
            if last and hits / n >= target:
                best = (value, hits / n, n)
        threshold = best[0] if best else math.nextafter(pairs[0][0], math.inf)
        per_class[category] = replace(rules.of(category), **{rule: threshold})
        chosen[str(category)] = {"threshold": threshold, "precision": best[1] if best else None,
                                 "candidates": best[2] if best else 0, "audited": len(pairs)}
    return replace(rules, per_class=per_class), {"rule": rule, "target_precision": target, "per_class": chosen}


def audit_report(truth: dict[int, AuditImage], audited: list[tuple[ImagePrediction, list]], rules: FilterRules,
                 categories: list[dict]) -> dict:
    """On the audited images: for each rule alone and for the kept set, how many candidates pass, the precision
    (share matching a labelled segment of their category with IoU > 0.5) and the recall (share of the labelled,
    non-crowd segments some passing candidate matches); and the PQ of the kept set (panoptic labels and
    non-overlapping pseudo-labels; else null)."""
    from pycocotools import mask as mask_utils

    from pipeline.evaluate import pq as pq_eval

    alone = {rule: [] for rule in RULES}
    kept_flags, correct, hit_tables = [], [], []  # hit_tables: per audited image, candidates x labelled segments
    n_truth = sum(sum(not c for c in t.crowd) for t in truth.values())
    stats = pq_eval.PQStats.zeros(len(categories))
    category_index = {c["id"]: i for i, c in enumerate(categories)}
    panoptic = all(t.panoptic is not None for t in truth.values())
    for prediction, verdicts in audited:
        label = truth[prediction.image_id]
        hits = _hits(prediction, label)
        duplicates = decide(prediction, FilterRules(Thresholds(), {}, rules.duplicate_iou))
        for k, s in enumerate(prediction.segments):
            failed = failures(s, rules.of(s.category_id))
            for rule in RULES[:-1]:
                alone[rule].append(rule not in failed)
            alone["duplicate"].append(duplicates[k][0] is None)
        kept_flags += [failed is None for failed, _ in verdicts]
        correct += hits.any(axis=1).tolist()
        hit_tables.append(hits)
        if panoptic and label.panoptic is not None:
            kept = ImagePrediction(prediction.image_id, prediction.file_name, prediction.height, prediction.width,
                                   tuple(s for s, (failed, _) in zip(prediction.segments, verdicts) if failed is None))
            try:
                ids, infos = kept.to_panoptic()
            except ValueError:  # overlapping pseudo-labels (an instance model's): no PQ
                panoptic = False
                continue
            stats += pq_eval.image_stats(prediction.image_id, label.panoptic[0], label.panoptic[1], ids, infos,
                                         category_index, "audit", drop_unknown_categories=True)
    if panoptic:  # audited images the predictions left empty: every labelled segment a false negative
        for image_id in set(truth) - {p.image_id for p, _ in audited}:
            ids, infos = truth[image_id].panoptic
            stats += pq_eval.image_stats(image_id, ids, infos, np.zeros_like(ids), [], category_index, "audit")
    correct_arr = np.array(correct, bool)

    def figures(passing: list[bool]) -> dict:
        chosen, found, offset = np.array(passing, bool), 0, 0
        for hits in hit_tables:
            found += int(hits[chosen[offset:offset + len(hits)]].any(axis=0).sum())
            offset += len(hits)
        return {"candidates": int(chosen.sum()),
                "precision": float(correct_arr[chosen].mean()) if chosen.any() else None,
                "recall": found / n_truth if n_truth else None}

    report = {"images": len(truth), "labelled_segments": n_truth, "candidates": len(correct),
              "per_rule": {rule: figures(flags) for rule, flags in alone.items()}, "kept": figures(kept_flags)}
    report["kept"]["pq"] = pq_eval.summarize(stats, categories)["All"]["pq"] if panoptic else None
    return report


def read_infer_output(pred: str) -> dict:
    """A `segpipe infer` output folder's run.json and categories.json; one line for a folder that is not one."""
    fs, path = url_to_fs(pred)
    if not fs.isdir(path) or not fs.exists(url_to_fs(join(pred, "run.json"))[1]):
        raise SegpipeError(f"{pred}: not a `segpipe infer` output folder (no run.json)")
    if not fs.exists(url_to_fs(join(pred, "categories.json"))[1]):
        raise SegpipeError(f"{pred}: no categories.json; is the infer run finished?")
    return {"run": read_json(join(pred, "run.json")), "categories": read_json(join(pred, "categories.json"))}


def _require_signal(files: list[str], pred: str, rule: str, column: str, how: str) -> None:
    """A rule on a signal needs a table that has it somewhere (a row without it then fails the rule): flip
    agreement from `infer --flip-check`, class agreement from `segpipe classify`."""
    for uri in files:
        fs, path = url_to_fs(uri)
        if column in pq.read_schema(path, filesystem=fs).names:
            values = pq.read_table(path, filesystem=fs, columns=[column]).column(0)
            if values.null_count < len(values):
                return
    signal = column.replace("_iou", " agreement").replace("_", " ")  # flip agreement, class agreement
    raise SegpipeError(f"{pred}: no {signal} to apply --{rule.replace('_', '-')} to; {how}")


def _write(uri: str, table: pa.Table) -> None:
    with atomic_write(uri) as f:
        pq.write_table(table, f)


def _rules_json(rules: FilterRules) -> dict:
    return {"thresholds": asdict(rules.thresholds), "duplicate_iou": rules.duplicate_iou,
            "per_class": {str(k): asdict(v) for k, v in sorted(rules.per_class.items())}}
