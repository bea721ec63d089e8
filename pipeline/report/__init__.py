"""`segpipe report`: a dataset's health, contents, model errors and comparison, per shard, merged into report.json and report.html.

Each section of the report is a pair of functions: `shard(data, context) -> part`, run where the shard
runs (this process, local workers or a Ray task; `map_shards`), and `merge(parts, context) -> dict`,
run on the driver over the parts in shard order; its dict is the section's key in report.json. A section
may also have `start(truth)`, run once on the driver before the shards (whole-file checks), whose result
its merge gets as a third argument. A shard's images are read once and handed to every section, so
memory holds one shard (plus each section's small part) per worker.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from pipeline.errors import SegpipeError
from pipeline.evaluate.runner import map_shards, without_cyclic_gc
from pipeline.io.fs import join, write_bytes, write_json
from pipeline.progress import Progress, quiet
from pipeline.report import compare, contents, errors, health, thumbnails
from pipeline.report.sources import Image, Predictions, Side, Truth, open_predictions, open_truth, read_side
from pipeline.structures import ImagePrediction


@dataclass(frozen=True)
class ReportConfig:
    """What `segpipe report` reads, where it writes, and how it runs."""

    dataset: str
    """Ground truth: a COCO instances or panoptic JSON (+ PNG folder), or a dataset table (`segpipe convert`)."""
    out: str
    """Folder for report.html and report.json."""
    pred: str | None = None
    """Predictions: COCO panoptic JSON, COCO results JSON, a predictions table or a `segpipe infer` output folder."""
    compare: str | None = None
    """A second prediction set of the same images, compared with `pred` (two models, two engine rounds)."""
    images: str | None = None
    """The image folder, for thumbnails (default: COCO's layout, ROOT/SPLIT beside ROOT/annotations/)."""
    workers: int = 1
    """Local worker processes (1: this process)."""
    address: str | None = None
    """Run the shards as Ray tasks on this cluster."""
    shard_size: int = 500
    """Images per shard: what one worker holds at once."""
    resamples: int = 1000
    """Bootstrap resamples of the images, for the comparison's confidence intervals."""
    seed: int = 0
    """Seed of the bootstrap's resample weights (the same seed gives the same intervals)."""
    thumbnails: int = 8
    """Images shown with their ground truth and prediction overlaid, spread evenly over the dataset."""
    leakage_with: tuple[str, ...] = ()
    """Other splits (COCO JSON in COCO's layout) whose images are compared with the dataset's: exact and near
    duplicates across splits."""


@dataclass(frozen=True)
class Context:
    """What every section's shard and merge functions know about the run (small: it travels with each shard)."""

    kind: str  # "panoptic" or "instances": decides PQ or AP
    categories: tuple[dict, ...]
    names: tuple[str, ...]  # the prediction sets' labels: () / ("pred",) / ("pred", "compare")
    resamples: int
    seed: int
    thumbnail_ids: frozenset[int]
    images: str | None  # image folder for thumbnails and the image-file checks, or None
    png_folder: str | None = None  # a panoptic ground truth's PNG folder (the health checks read it)
    split: str = ""  # the ground truth's split name (health: duplicates across splits)


@dataclass
class ShardData:
    """A shard's images, read once: ground truth and every prediction set (None where not given)."""

    images: list[Image]
    truth: list[ImagePrediction]
    predictions: list[ImagePrediction] | None = None
    compare: list[ImagePrediction] | None = None
    truth_entries: tuple | None = None  # a JSON ground truth's own annotations per image (health reads them raw)


@dataclass(frozen=True)
class Section:
    """One part of the report: a per-shard function and a merge of the parts (in shard order)."""

    name: str
    shard: Callable[[ShardData, Context], Any]
    merge: Callable[..., dict]  # merge(parts, context), or merge(parts, context, started) with `start`
    needs_predictions: bool = False
    start: Callable[[Truth], Any] | None = None  # on the driver, before the shards


def _health_shard(data: ShardData, context: Context) -> health.HealthPart:
    """The health checks of a shard: its JSON annotations as written (none for a table), its image files."""
    entries = data.truth_entries or ()
    annotations = [a for entry in entries if entry for a in (entry if isinstance(entry, list) else [entry])]
    images = [{"id": im.id, "file_name": im.file_name, "height": im.height, "width": im.width} for im in data.images]
    return health.shard_checks(health.HealthShard(images, annotations, context.kind, list(context.categories),
                                                  context.images, context.png_folder, context.split))


def _health_start(truth: Truth) -> dict:
    """The whole-file checks (ids, categories, distribution) of a JSON ground truth, read again as written; a table
    gets none (`segpipe convert` checked its COCO file when it wrote it), only the shards' checks."""
    from pipeline.validate import read_coco

    coco = read_coco(truth.side.uri)[0] if truth.entries is not None else None
    return health.global_checks(coco, truth.kind, _split(truth)) if coco is not None else {}


def _health_merge(parts: list, context: Context, started: tuple[dict, list]) -> dict:
    """`started`: the whole-file checks and the parts of the other splits (their image files: leakage)."""
    checks, others = started
    nothing = {"split": context.split, "found": {}, "checked": [], "summary": {}}  # a table: see _health_start
    return health.merge(checks or nothing, [*parts, *others])


def _other_splits(uris: tuple[str, ...], config: ReportConfig, progress: Progress) -> list:
    """The health parts of other splits' images (their files read, their pixels hashed): what leakage compares."""
    parts = []
    for uri in uris:
        other = open_truth(uri)
        folder = _image_folder(other)
        if folder is None:
            raise SegpipeError(f"{uri}: --leakage-with needs COCO's layout (ROOT/annotations/*_SPLIT.json, its images "
                               "in ROOT/SPLIT)")
        images = [{"id": im.id, "file_name": im.file_name, "height": im.height, "width": im.width} for im in other.images]
        shards = [health.HealthShard(images[k:k + config.shard_size], [], other.kind, other.categories, folder, None,
                                     _split(other)) for k in range(0, len(images), config.shard_size)]
        progress(f"hashing {len(images):,} images of {uri} (leakage)")
        parts += map_shards(health.shard_checks, shards, config.workers, config.address)
    return parts


def _errors_shard(data: ShardData, context: Context) -> errors.ErrorsPart:
    return errors.shard_errors(data.truth, data.predictions, list(context.categories), context.kind == "panoptic")


def _errors_merge(parts: list, context: Context) -> dict:
    return errors.merge_errors(parts, list(context.categories), context.kind == "panoptic")


SECTIONS: tuple[Section, ...] = (
    Section("health", _health_shard, _health_merge, start=_health_start),
    Section("contents", contents.shard, contents.merge),
    Section("errors", _errors_shard, _errors_merge, needs_predictions=True),
    Section("comparison", compare.shard, compare.merge, needs_predictions=True),
    Section("thumbnails", thumbnails.shard, thumbnails.merge),
)


@dataclass(frozen=True)
class _Shard:
    """The images one task reads, with the JSON entries of JSON sides (tables are read by the task)."""

    images: tuple[Image, ...]
    sides: tuple[tuple[Side, tuple | None], ...]  # (ground truth, predictions?, compare?) and their entries
    context: Context
    sections: tuple[str, ...]


@dataclass
class Report:
    """What `run` produced: the JSON (every number the page shows) and where it wrote the files."""

    data: dict
    html: str
    json: str
    warnings: list[str] = field(default_factory=list)


def run(config: ReportConfig, progress: Progress = quiet) -> Report:
    """Read, shard, compute every section, merge, and write `OUT/report.json` and `OUT/report.html`."""
    from pipeline.report import html

    if config.compare and not config.pred:
        raise SegpipeError("--compare needs --pred (the two prediction sets compared)")
    if config.shard_size < 1:
        raise SegpipeError(f"--shard-size {config.shard_size}: need at least 1")
    for uri in config.leakage_with:  # before any work
        if _split_of(uri) == _split_of(config.dataset):
            raise SegpipeError(f"{uri}: --leakage-with names the split {_split_of(uri)!r} again; give another split")
    progress(f"reading {config.dataset}")
    truth = open_truth(config.dataset)
    predictions = [open_predictions(uri, truth) for uri in (config.pred, config.compare) if uri]
    context = Context(truth.kind, tuple(truth.categories), ("pred", "compare")[:len(predictions)], config.resamples,
                      config.seed, _spread(truth.images, config.thumbnails), config.images or _image_folder(truth),
                      truth.side.folder, _split(truth))
    sections = tuple(s.name for s in SECTIONS if predictions or not s.needs_predictions)
    started = {s.name: s.start(truth) for s in SECTIONS if s.start is not None and s.name in sections}
    shards = _shards(truth, predictions, context, sections, config.shard_size)
    total = len(truth.images)
    progress(f"{total:,} images in {len(shards)} shards of up to {config.shard_size}")

    def done(count: int) -> None:
        images = min(count * config.shard_size, total)
        progress(f"shard {count}/{len(shards)} done ({images:,}/{total:,} images)", count, len(shards))

    parts = map_shards(_run_shard, shards, config.workers, config.address, progress=done, fold=_fold)
    if "health" in started:
        started["health"] = (started["health"], _other_splits(config.leakage_with, config, progress))
    data = {"inputs": {"dataset": config.dataset, "kind": truth.kind, "pred": config.pred, "compare": config.compare,
                       "images": config.images, "shards": len(shards), "leakage_with": list(config.leakage_with)},
            "categories": [{k: c.get(k) for k in ("id", "name", "isthing")} for c in truth.categories]}
    for section in SECTIONS:
        if section.name in sections:
            progress(f"merging {section.name}")
            merged = [part for p in parts for part in (p[section.name] if isinstance(p[section.name], _Kept)
                                                       else [p[section.name]])]
            data[section.name] = (section.merge(merged, context, started[section.name]) if section.name in started
                                  else section.merge(merged, context))
    if "errors" in data:  # the label-error candidates, for people to look at (the review hand-off's CVAT file)
        progress("drawing the worst images and the label-error candidates")
        data["errors"]["thumbnails"] = _error_thumbnails(data["errors"], truth, predictions, context)
        images = [{"id": im.id, "file_name": im.file_name, "height": im.height, "width": im.width} for im in truth.images]
        write_json(join(config.out, "label-errors.json"),
                   errors.candidates_coco(data["errors"], images, list(truth.categories)))
    progress("writing the report")
    page = html.render(data)
    html_uri, json_uri = join(config.out, "report.html"), join(config.out, "report.json")
    write_json(json_uri, html.without_pixels(data))
    write_bytes(html_uri, page.encode("utf-8"))
    return Report(data, html_uri, json_uri)


def _split(truth: Truth) -> str:
    return _split_of(truth.side.uri)


def _split_of(uri: str) -> str:
    """The split a COCO file names (annotations/panoptic_val2017.json: val2017), else the file's stem."""
    import re

    stem = uri.rstrip("/").rsplit("/", 1)[-1].removesuffix(".json")
    return re.sub(r"^(panoptic|instances)_", "", stem)


def _error_thumbnails(section: dict, truth: Truth, predictions: list[Predictions], context: Context,
                      count: int = 6) -> dict[str, str]:
    """JPEGs (ground truth | predictions) of the worst images by PQ and of the images of the strongest label-error
    candidates, read again on the driver: a dozen images, whatever the dataset's size."""
    wanted = [w["image_id"] for w in section.get("worst_images", [])[:count]]
    wanted += [c["image_id"] for c in section.get("candidates", [])[:count]]
    by_id = {im.id: im for im in truth.images}
    chosen = [by_id[i] for i in dict.fromkeys(wanted) if i in by_id]
    if not chosen:
        return {}
    sides = [(truth.side, truth.entries), (predictions[0].side, predictions[0].entries)]
    read = [read_side(side, chosen, None if entries is None else [entries.get(im.id) for im in chosen], truth=k == 0)
            for k, (side, entries) in enumerate(sides)]
    return {str(image.id): thumbnails.strip(context.images, gt, pred)
            for image, gt, pred in zip(chosen, *read)}


def _spread(images: list[Image], count: int) -> frozenset[int]:
    """`count` image ids spread evenly over the dataset (the first and every n-th)."""
    if count <= 0 or not images:
        return frozenset()
    step = max(len(images) / count, 1)
    return frozenset(images[int(k * step)].id for k in range(min(count, len(images))))


def _image_folder(truth: Truth) -> str | None:
    """COCO's layout: ROOT/annotations/{panoptic,instances}_SPLIT.json labels the images in ROOT/SPLIT."""
    import re

    match = re.search(r"(.*)/annotations/(?:panoptic|instances)_([^/]+)\.json$", truth.side.uri)
    return f"{match[1]}/{match[2]}" if match else None


def _shards(truth: Truth, predictions: list[Predictions], context: Context, sections: tuple[str, ...],
            size: int) -> list[_Shard]:
    shards = []
    for start in range(0, len(truth.images), size):
        images = tuple(truth.images[start:start + size])
        sides = tuple((side, None if entries is None else tuple(entries.get(im.id) for im in images))
                      for side, entries in [(truth.side, truth.entries), *((p.side, p.entries) for p in predictions)])
        shards.append(_Shard(images, sides, context, sections))
    return shards


def _fold(done: dict[str, Any], part: dict[str, Any]) -> dict[str, Any]:
    """Two shards' parts as one, section by section: parts that add (`+=`: sums, counts, top-k lists) are added,
    so the driver holds one of them whatever the number of shards; the others (health's image fingerprints,
    AP's per-image matches, which their merge needs whole) are kept in a list. A merge gets a list either way."""
    folded = {}
    for name, mine in done.items():
        theirs = part[name]
        if isinstance(mine, _Kept):
            mine.append(theirs)
        elif hasattr(mine, "__iadd__"):
            mine += theirs
        else:
            mine = _Kept([mine, theirs])
        folded[name] = mine
    return folded


class _Kept(list):
    """A section's parts that do not add, kept in shard order."""


@without_cyclic_gc
def _run_shard(shard: _Shard) -> dict[str, Any]:
    """Read the shard's sides once and run each section's shard function on them."""
    images = list(shard.images)
    read = [read_side(side, images, entries, truth=k == 0) for k, (side, entries) in enumerate(shard.sides)]
    data = ShardData(images, *read)
    data.truth_entries = shard.sides[0][1]
    by_name = {s.name: s for s in SECTIONS}
    return {name: by_name[name].shard(data, shard.context) for name in shard.sections}
