"""`segpipe report`: a dataset's health, contents, model errors and comparison, per shard, merged into report.json and report.html.

Each section of the report is a pair of functions: `shard(data, context) -> part`, run where the shard
runs (this process, local workers or a Ray task; `map_shards`), and `merge(parts, context) -> dict`,
run on the driver over the parts in shard order; its dict is the section's key in report.json. A section
may also have `start(truth)`, run once on the driver before the shards (whole-file checks), whose result
its merge gets as a third argument. A shard's images are read once and handed to every section, so
memory holds one shard (plus each section's small part) per worker.
"""

from __future__ import annotations

import bisect
import copy
import operator
import uuid
from collections.abc import Callable
from dataclasses import dataclass, field, replace
from typing import Any

import pyarrow as pa

from pipeline.errors import SegpipeError
from pipeline.evaluate.runner import map_shards, without_cyclic_gc
from pipeline.io.fs import absolute, join, write_bytes, write_json
from pipeline.progress import Progress, quiet
from pipeline.report import compare, contents, errors, health, thumbnails
from pipeline.report.parts import Parts
from pipeline.report.sources import Image, Predictions, Side, Truth, open_predictions, open_truth, read_side
from pipeline.structures import ImagePrediction


@dataclass(frozen=True)
class ReportConfig:
    """What `segpipe report` reads, where it writes, and how it runs."""

    dataset: str
    """Ground truth: a COCO instances or panoptic JSON (+ PNG folder), or a dataset table (`segpipe convert`)."""
    out: str
    """Folder for report.html and report.json, and while the report runs its scratch folder OUT/.parts-*, which the
    shards write: with `address` on several machines, storage every node reaches (s3://..., a shared mount)."""
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
    parts: str = ""  # the scratch folder where shards write their per-image and per-detection records (parts.py)


@dataclass
class ShardData:
    """A shard's images, read once: ground truth and every prediction set (None where not given)."""

    images: list[Image]
    truth: list[ImagePrediction]
    predictions: list[ImagePrediction] | None = None
    compare: list[ImagePrediction] | None = None
    truth_entries: tuple | None = None  # a JSON ground truth's own annotations per image (health reads them raw)
    index: int = 0  # the shard's position: its records' part in the scratch folder


@dataclass(frozen=True)
class Section:
    """One part of the report: a per-shard function and a merge of the parts (in shard order)."""

    name: str
    shard: Callable[[ShardData, Context], Any]
    merge: Callable[..., dict]  # merge(parts, context), or merge(parts, context, started) with `start`
    needs_predictions: bool = False
    start: Callable[[Truth], Any] | None = None  # on the driver, before the shards


def _health_shard(data: ShardData, context: Context) -> health.HealthPart:
    """The health checks of a shard: its JSON annotations as written (none for a table), its image files (their
    fingerprints go to the scratch folder)."""
    entries = data.truth_entries or ()
    annotations = [a for entry in entries if entry for a in (entry if isinstance(entry, list) else [entry])]
    images = [{"id": im.id, "file_name": im.file_name, "height": im.height, "width": im.width} for im in data.images]
    part = health.shard_checks(health.HealthShard(images, annotations, context.kind, list(context.categories),
                                                  context.images, context.png_folder, context.split))
    return health.spill(part, Parts(context.parts), data.index)


def _health_start(truth: Truth) -> dict:
    """The whole-file checks (ids, categories, distribution) of a JSON ground truth, on the file as parsed; a table
    gets none (`segpipe convert` checked its COCO file when it wrote it), only the shards' checks."""
    return health.global_checks(truth.raw, truth.kind, _split(truth)) if truth.raw is not None else {}


def _health_merge(parts: list, context: Context, started: tuple[dict, list]) -> dict:
    """`started`: the whole-file checks and the parts of the other splits (their image files: leakage)."""
    checks, others = started
    nothing = {"split": context.split, "found": {}, "checked": [], "summary": {}}  # a table: see _health_start
    return health.merge(checks or nothing, [*parts, *others], Parts(context.parts))


def _other_splits(uris: tuple[str, ...], config: ReportConfig, scratch: Parts, progress: Progress) -> list:
    """The health parts of other splits' images (their files read, their pixels hashed): what leakage compares."""
    parts = []
    for uri in uris:
        other = open_truth(uri)
        folder = _image_folder(other)
        if folder is None:
            raise SegpipeError(f"{uri}: --leakage-with needs COCO's layout (ROOT/annotations/*_SPLIT.json, its images "
                               "in ROOT/SPLIT)")
        images = [{"id": im.id, "file_name": im.file_name, "height": im.height, "width": im.width} for im in other.images]
        shards = [(k, health.HealthShard(images[k:k + config.shard_size], [], other.kind, other.categories, folder,
                                         None, _split(other)), scratch.uri) for k in range(0, len(images), config.shard_size)]
        progress(f"hashing {len(images):,} images of {uri} (leakage)")
        parts += map_shards(_other_split_shard, shards, config.workers, config.address, fold=operator.iadd)
    return parts


def _other_split_shard(job: tuple[int, health.HealthShard, str]) -> health.HealthPart:
    """One shard of another split's images: their checks, their fingerprints written to the scratch folder."""
    index, shard, scratch = job
    return health.spill(health.shard_checks(shard), Parts(scratch), index)


def _errors_shard(data: ShardData, context: Context) -> errors.ErrorsPart:
    part = errors.shard_errors(data.truth, data.predictions, list(context.categories), context.kind == "panoptic")
    return errors.spill(part, Parts(context.parts), data.index)


def _errors_merge(parts: list, context: Context) -> dict:
    return errors.merge_errors(parts, list(context.categories), context.kind == "panoptic", Parts(context.parts))


SECTIONS: tuple[Section, ...] = (
    Section("health", _health_shard, _health_merge, start=_health_start),
    Section("contents", contents.shard, contents.merge),
    Section("errors", _errors_shard, _errors_merge, needs_predictions=True),
    Section("comparison", compare.shard, compare.merge, needs_predictions=True),
    Section("thumbnails", thumbnails.shard, thumbnails.merge),
)


@dataclass(frozen=True)
class _Shard:
    """What one task reads: its images and the JSON sides' entries from the scratch folder, tables where they are."""

    index: int  # position in the shard order: the shard's files in the scratch folder
    sides: tuple[Side, ...]  # ground truth, predictions?, compare?
    entries: tuple[bool, ...]  # per side: entries in the scratch folder
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
    """Read, shard, compute every section, merge, and write `OUT/report.json` and `OUT/report.html`; the shards'
    per-image and per-detection records go to a scratch folder OUT/.parts-*, removed at the end."""
    if config.compare and not config.pred:
        raise SegpipeError("--compare needs --pred (the two prediction sets compared)")
    if config.shard_size < 1:
        raise SegpipeError(f"--shard-size {config.shard_size}: need at least 1")
    for uri in config.leakage_with:  # before any work
        if _split_of(uri) == _split_of(config.dataset):
            raise SegpipeError(f"{uri}: --leakage-with names the split {_split_of(uri)!r} again; give another split")
    scratch = Parts(join(absolute(config.out), f".parts-{uuid.uuid4().hex[:12]}"))  # Ray workers run elsewhere
    try:
        return _report(config, progress, scratch)
    finally:
        scratch.remove()


def _report(config: ReportConfig, progress: Progress, scratch: Parts) -> Report:
    from pipeline.report import html

    progress(f"reading {config.dataset}")
    truth = open_truth(config.dataset)
    uris = [uri for uri in (config.pred, config.compare) if uri]
    sections = tuple(s.name for s in SECTIONS if uris or not s.needs_predictions)
    started = {s.name: s.start(truth) for s in SECTIONS if s.start is not None and s.name in sections}
    context = Context(truth.kind, tuple(truth.categories), ("pred", "compare")[:len(uris)], config.resamples,
                      config.seed, _spread(truth.images, config.thumbnails), config.images or _image_folder(truth),
                      truth.side.folder, _split(truth), scratch.uri)
    total = len(truth.images)
    layout = _lay_out(truth, config.shard_size, scratch)
    truth = replace(truth, entries=None, raw=None)  # one COCO file parsed at a time
    for uri in uris:
        progress(f"reading {uri}")
        layout = _with_predictions(layout, open_predictions(uri, truth), truth, config.shard_size, scratch)
    truth = replace(truth, images=[])  # the driver keeps no image list
    shards = [_Shard(k, layout.sides, layout.entries, context, sections) for k in range(len(layout.firsts))]
    progress(f"{total:,} images in {len(shards)} shards of up to {config.shard_size}")

    def done(count: int) -> None:
        images = min(count * config.shard_size, total)
        progress(f"shard {count}/{len(shards)} done ({images:,}/{total:,} images)", count, len(shards))

    parts = map_shards(_run_shard, shards, config.workers, config.address, progress=done, fold=_fold)
    if "health" in started:
        started["health"] = (started["health"], _other_splits(config.leakage_with, config, scratch, progress))
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
        data["errors"]["thumbnails"] = _error_thumbnails(data["errors"], layout, scratch, context)
        chosen = layout.images({c["image_id"] for c in data["errors"]["candidates"]}, scratch)
        images = [{"id": im.id, "file_name": im.file_name, "height": im.height, "width": im.width} for im, _ in chosen]
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


def _error_thumbnails(section: dict, layout: _Layout, scratch: Parts, context: Context,
                      count: int = 6) -> dict[str, str]:
    """JPEGs (ground truth | predictions) of the worst images by PQ and of the images of the strongest label-error
    candidates, read again on the driver: a dozen images, whatever the dataset's size."""
    wanted = [w["image_id"] for w in section.get("worst_images", [])[:count]]
    wanted += [c["image_id"] for c in section.get("candidates", [])[:count]]
    chosen = layout.images(wanted, scratch)
    strips = {}
    for image, entries in chosen:
        gt, pred = (read_side(side, [image], None if e is None else [e], truth=k == 0)[0]
                    for k, (side, e) in enumerate(zip(layout.sides[:2], entries[:2])))
        strips[str(image.id)] = thumbnails.strip(context.images, gt, pred)
    return strips


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


@dataclass(frozen=True)
class _Layout:
    """Where the shards' inputs are: each shard's images (and each JSON side's entries for them) in the scratch
    folder, `firsts` the shards' first image ids."""

    sides: tuple[Side, ...]  # ground truth, predictions?, compare?
    entries: tuple[bool, ...]  # per side: entries in the scratch folder (JSON) or none (tables)
    firsts: tuple[int, ...]

    def images(self, ids, scratch: Parts) -> list[tuple[Image, list]]:
        """The images of `ids` (in the order given; ids of no image left out), each with its entries per side."""
        found, wanted = {}, set(ids)
        for k in sorted({bisect.bisect_right(self.firsts, i) - 1 for i in wanted} - {-1}):  # a shard at a time
            images = _read_images(scratch, k)
            entries = [scratch.read_json(f"entries-{n}", k) if has else None for n, has in enumerate(self.entries)]
            found.update({im.id: (im, [e if e is None else e[p] for e in entries])
                          for p, im in enumerate(images) if im.id in wanted})
        return [found[i] for i in dict.fromkeys(ids) if i in found]


def _lay_out(truth: Truth, size: int, scratch: Parts) -> _Layout:
    """Write each shard's images and, for a JSON ground truth, their entries to the scratch folder."""
    chunks = _chunks(truth, size)
    for k, chunk in enumerate(chunks):
        scratch.write("images", k, pa.table({"id": pa.array([im.id for im in chunk], pa.int64()),
                                             "file_name": [im.file_name for im in chunk],
                                             "height": [im.height for im in chunk], "width": [im.width for im in chunk]}))
    _write_entries(scratch, 0, truth.entries, chunks)
    return _Layout((truth.side,), (truth.entries is not None,), tuple(chunk[0].id for chunk in chunks))


def _with_predictions(layout: _Layout, predictions: Predictions, truth: Truth, size: int, scratch: Parts) -> _Layout:
    """The layout with a prediction set added: for a JSON file, its entries written per shard (then dropped)."""
    _write_entries(scratch, len(layout.sides), predictions.entries, _chunks(truth, size))
    return replace(layout, sides=(*layout.sides, predictions.side),
                   entries=(*layout.entries, predictions.entries is not None))


def _chunks(truth: Truth, size: int) -> list[list[Image]]:
    return [truth.images[start:start + size] for start in range(0, len(truth.images), size)]


def _write_entries(scratch: Parts, side: int, entries: dict | None, chunks: list[list[Image]]) -> None:
    if entries is not None:
        for k, chunk in enumerate(chunks):
            scratch.write_json(f"entries-{side}", k, [entries.get(im.id) for im in chunk])


def _read_images(scratch: Parts, shard: int) -> list[Image]:
    table = scratch.read_part("images", shard)
    return [Image(*row) for row in zip(*(table.column(name).to_pylist() for name in ("id", "file_name", "height", "width")))]


def _fold(done: dict[str, Any], part: dict[str, Any]) -> dict[str, Any]:
    """Two shards' parts as one, section by section: parts that add (`+=`: sums, counts, top-k lists) are added,
    so the driver holds one of them whatever the number of shards; the others are kept in a list. A merge gets
    a list either way. The first part is copied before anything is added to it: from a Ray task its arrays are
    read-only views of the object store."""
    folded = _Folded() if isinstance(done, _Folded) else _Folded(copy.deepcopy(done))
    for name, mine in (done if isinstance(done, _Folded) else folded).items():
        theirs = part[name]
        if isinstance(mine, _Kept):
            mine.append(theirs)
        elif hasattr(mine, "__iadd__"):
            mine += theirs
        else:
            mine = _Kept([mine, theirs])
        folded[name] = mine
    return folded


class _Folded(dict):
    """Parts folded so far (the driver's own copy)."""


class _Kept(list):
    """A section's parts that do not add, kept in shard order."""


@without_cyclic_gc
def _run_shard(shard: _Shard) -> dict[str, Any]:
    """Read the shard's sides once and run each section's shard function on them."""
    scratch = Parts(shard.context.parts)
    images = _read_images(scratch, shard.index)
    entries = [scratch.read_json(f"entries-{n}", shard.index) if has else None for n, has in enumerate(shard.entries)]
    read = [read_side(side, images, e, truth=k == 0) for k, (side, e) in enumerate(zip(shard.sides, entries))]
    data = ShardData(images, *read, truth_entries=entries[0], index=shard.index)
    by_name = {s.name: s for s in SECTIONS}
    return {name: by_name[name].shard(data, shard.context) for name in shard.sections}
