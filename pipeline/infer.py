"""The inference stage: image shards through model actors on Ray Data, to Parquet and COCO files.

    read + decode (CPU tasks) -> model.forward (actors, one GPU each) -> postprocess + PNGs (CPU tasks)
    -> per-shard commit on the driver: Parquet part, then the part's JSON fragment (the commit marker)
    -> at the end: panoptic_<name>.json, instances_<name>_results.json, errors.parquet, summary.json

Each input shard is committed whole or not at all: its fragment is written last, atomically, so a
rerun after a crash skips exactly the committed shards and redoes the rest, writing the same bytes
(batches are cut within a shard, so they hold the same images in every run).
"""

from __future__ import annotations

import hashlib
import json
import os
import pickle
import tarfile
import time
from collections.abc import Iterator
from dataclasses import asdict, dataclass, field, replace
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from pipeline.cluster import connect
from pipeline.errors import SegpipeError, WorkFailed
from pipeline.io.decode import ImageDecodeError, decode_image
from pipeline.io.fs import absolute, join, read_json, url_to_fs, write_bytes, write_json
from pipeline.io.shards import Shard, list_shards, read_shard
from pipeline.io.tables import read_predictions, write_predictions
from pipeline.models import PROPOSALS, ModelSettings, check_model_name, describe, family  # noqa: F401 (ModelSettings: for callers)
from pipeline.models.outputs import PanopticPostprocess, Postprocess
from pipeline.progress import Progress, quiet
from pipeline.signals import flip_agreement
from pipeline.structures import ImagePrediction, encode_panoptic_png

ACTOR_START_TIMEOUT_S = 600
TASK_CPUS = 0.5
"""Logical CPUs of each read and post-processing task: with the model actors' share, what Ray Data may run."""
IMAGES_PER_ROW = 64
"""About how many images travel together through Ray Data (whole model batches): fewer, larger rows cut
the per-row cost of Ray (a task call, a block, a wake-up of every stage), which a small model on a CPU feels."""
ROW_BYTES = 64 << 20
"""...or fewer, once a row's decoded pixels reach this (big images), but never less than one batch."""
FORMAT_VERSION = 1


@dataclass(frozen=True)
class InferConfig:
    """One run of `segpipe infer`."""

    input: str
    out: str
    model: str
    settings: ModelSettings = ModelSettings()
    name: str = "pred"
    """Exports are panoptic_<name>.json (+ folder) and instances_<name>_results.json."""
    batch_size: int = 4
    actors: int = 1
    gpus_per_actor: float = 0.0
    cpus_per_actor: float | None = None
    """Default: what is left after 1 CPU for reading and post-processing, shared; at most 1 with GPUs."""
    files_per_shard: int = 64
    """Image folders are cut into shards of this many files (the unit of commit and resume)."""
    image_info: str | None = None
    """A COCO JSON whose `images` give each file's id (and size, checked); else ids come from names."""
    flip_check: bool = False
    """Also label each image mirrored, for every segment's flip agreement (pipeline.signals); twice the model time."""
    address: str | None = None
    shards: tuple[Shard, ...] | None = None
    """Label exactly these shards of `input` instead of all it holds (a scheduled tick's batch)."""


@dataclass
class Summary:
    """What a run did; written to OUT/summary.json and printed."""

    images: int = 0
    segments: int = 0
    failed: int = 0
    shards: int = 0
    shards_resumed: int = 0
    wall_s: float = 0.0
    images_per_s: float = 0.0
    ray_s: float = 0.0
    """Part of wall_s spent starting (or joining) Ray, and stopping the local Ray this run started."""
    steady_images_per_s: float = 0.0
    """Images per second between the first and the last shard commit (startup and merge left out)."""
    stage_s: dict[str, float] = field(default_factory=lambda: dict.fromkeys(("decode", "model", "postprocess", "write"), 0.0))
    actors: list[dict] = field(default_factory=list)
    outputs: dict[str, str] = field(default_factory=dict)


# --- image ids ------------------------------------------------------------------------------------

def image_id_for(key: str) -> int:
    """COCO's convention (`000000000139.jpg` is image 139), else a stable 53-bit hash of the name
    (exact in JSON readers that use doubles). Collisions are caught when the run is merged."""
    stem = key.rsplit("/", 1)[-1].rsplit(".", 1)[0]
    if stem.isdigit():
        return int(stem)
    return int.from_bytes(hashlib.blake2b(key.encode(), digest_size=8).digest(), "big") >> 11


def png_name(key: str) -> str:
    return key.rsplit(".", 1)[0] + ".png" if "." in key.rsplit("/", 1)[-1] else key + ".png"


# --- what travels between the stages ----------------------------------------------------------------

@dataclass(frozen=True)
class Item:
    """One image of a shard on its way through the stages: an `error` (it could not be read or decoded),
    else its id and size, and after post-processing its `prediction`."""

    position: int  # in its shard
    key: str  # the file's name in its shard
    image_id: int = 0
    height: int = 0
    width: int = 0
    error: str | None = None
    prediction: ImagePrediction | None = None


@dataclass(frozen=True)
class Actor:
    """Where a model ran: for the summary, and to check GPU pinning."""

    pid: int
    node: str
    device: str
    threads: int
    cuda_visible_devices: str
    load_s: float


@dataclass(frozen=True)
class Chunk:
    """Whole model batches of one shard: one Ray Data row (pickled). Each stage hands on a copy with its
    part done: reading gives `items` and the decoded `images` (of the items without an error, in order), the
    model turns the images into `raws` (one raw output per image) and names its `postprocess`,
    post-processing turns the raws into the items' predictions."""

    items: tuple[Item, ...]
    images: tuple[np.ndarray, ...] = ()
    raws: tuple[dict[str, Any], ...] = ()
    flipped_raws: tuple[dict[str, Any], ...] = ()  # of the mirrored images, with --flip-check
    postprocess: Postprocess | None = None
    actor: Actor | None = None
    decode_s: float = 0.0
    model_s: float = 0.0
    post_s: float = 0.0


# --- the stages that run on Ray ---------------------------------------------------------------------

def _row_full(images: list[np.ndarray], batch_size: int) -> bool:
    """Whether a row may end here: whole batches only, about IMAGES_PER_ROW images or ROW_BYTES of pixels."""
    count = len(images)
    if count == 0 or count % batch_size:
        return False
    return count >= IMAGES_PER_ROW or sum(image.nbytes for image in images) >= ROW_BYTES


def _read(row: dict, *, shards: list[Shard], batch_size: int, image_info: dict | None) -> Iterator[dict]:
    """One shard's images, decoded, as rows of whole batches (a batch never spans two shards); the
    shard's last row is marked `final`, so the driver knows when the shard is complete."""
    index, number = row["shard"], 0
    items: list[Item] = []
    images: list[np.ndarray] = []
    seconds = 0.0

    def emit(final: bool) -> dict:
        chunk = Chunk(tuple(items), tuple(images), decode_s=seconds)
        return {"shard": index, "chunk": number, "final": final, "payload": pickle.dumps(chunk, protocol=5)}

    for item, image, spent in _decoded(shards[index], image_info):
        if _row_full(images, batch_size):  # and the shard goes on
            yield emit(False)
            number, items, images, seconds = number + 1, [], [], 0.0
        items.append(item)
        seconds += spent
        if image is not None:
            images.append(image)
    yield emit(True)


def _decoded(shard: Shard, image_info: dict | None) -> Iterator[tuple[Item, np.ndarray | None, float]]:
    """(item, RGB image or None when it failed, seconds spent) for each image of the shard, in order."""
    for position, record in enumerate(_records(shard)):
        start = time.perf_counter()
        if record.error is not None:  # the shard itself could not be read (further)
            yield Item(position, record.key, error=record.error), None, 0.0
            continue
        try:
            image = decode_image(record.data)
            if image_info is None:
                image_id = image_id_for(record.key)
            elif record.key not in image_info:
                raise ImageDecodeError("not listed in --image-info")
            else:
                image_id, expected = image_info[record.key]
                if expected and expected != image.shape[:2]:
                    raise ImageDecodeError(f"is {image.shape[0]}x{image.shape[1]}, --image-info says "
                                           f"{expected[0]}x{expected[1]}")
            item = Item(position, record.key, image_id, *image.shape[:2])
        except ImageDecodeError as error:
            item, image = Item(position, record.key, error=str(error)), None
        yield item, image, time.perf_counter() - start


@dataclass(frozen=True)
class _Record:
    key: str
    data: bytes = b""
    error: str | None = None


def _records(shard: Shard) -> Iterator[_Record]:
    """The shard's images; a shard that breaks off (corrupt tar or Parquet, a vanished file) ends in
    one error record naming how far it got, so the failure lands in the errors table, not in a retry loop."""
    count = 0
    try:
        for record in read_shard(shard):
            count += 1
            yield _Record(record.key, record.data)
    except (OSError, EOFError, ValueError, tarfile.TarError, pa.ArrowException, SegpipeError) as error:
        yield _Record(f"(shard after {count} images)", error=f"shard unreadable: {type(error).__name__}: {error}")


class _Predictor:
    """A model actor: builds the model once on its device, then runs `forward` on each row's batches."""

    def __init__(self, model: str, settings: ModelSettings, threads: int, batch_size: int, flip: bool = False) -> None:
        start = time.perf_counter()
        import torch

        from pipeline.models import load_model

        torch.set_num_threads(threads)
        device = "cuda" if torch.cuda.is_available() else "cpu"  # Ray set CUDA_VISIBLE_DEVICES to our GPU
        self.model = load_model(model, replace(settings, device=device))
        self.batch_size = batch_size
        self.flip = flip
        self.actor = Actor(os.getpid(), os.uname().nodename, device, threads, os.environ.get("CUDA_VISIBLE_DEVICES", ""),
                           time.perf_counter() - start)

    def __call__(self, rows: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        return {**rows, "payload": np.array([pickle.dumps(self._run(pickle.loads(data)), protocol=5)
                                             for data in rows["payload"]], dtype=object)}

    def _run(self, chunk: Chunk) -> Chunk:
        start = time.perf_counter()
        raws = self._forward(chunk.images)
        flipped = self._forward(tuple(np.ascontiguousarray(image[:, ::-1]) for image in chunk.images)) if self.flip else ()
        return replace(chunk, images=(), raws=raws, flipped_raws=flipped, postprocess=self.model.postprocess,
                       actor=self.actor, model_s=time.perf_counter() - start)

    def _forward(self, images: tuple[np.ndarray, ...]) -> tuple[dict[str, Any], ...]:
        return tuple(raw for i in range(0, len(images), self.batch_size)
                     for raw in self.model.forward(list(images[i:i + self.batch_size])))


def _postprocess(rows: dict[str, np.ndarray], *, png_dir: str | None) -> dict[str, np.ndarray]:
    """One row's raw outputs to segments (RLE), its panoptic PNGs written here; the driver gets the rest."""
    return {**rows, "payload": np.array([_postprocess_row(data, png_dir) for data in rows["payload"]], dtype=object)}


def _postprocess_row(data: bytes, png_dir: str | None) -> bytes:
    chunk: Chunk = pickle.loads(data)
    start = time.perf_counter()
    postprocess, raws, flipped_raws, items = chunk.postprocess, iter(chunk.raws), iter(chunk.flipped_raws), []
    for item in chunk.items:
        if item.error is None:
            if isinstance(postprocess, PanopticPostprocess):
                ids, segments = postprocess.panoptic(next(raws))
                prediction = ImagePrediction.from_panoptic(item.image_id, item.key, ids, segments)
                write_bytes(join(png_dir, png_name(item.key)), encode_panoptic_png(ids))
            else:
                prediction = postprocess(next(raws), item.image_id, item.key)
            if chunk.flipped_raws:
                agreement = flip_agreement(prediction, postprocess(next(flipped_raws), item.image_id, item.key))
                prediction = replace(prediction, segments=tuple(
                    replace(segment, flip_iou=iou) for segment, iou in zip(prediction.segments, agreement)))
            item = replace(item, prediction=prediction)
        items.append(item)
    done = replace(chunk, items=tuple(items), raws=(), flipped_raws=(), postprocess=None,
                   post_s=time.perf_counter() - start)
    return pickle.dumps(done, protocol=5)


# --- the driver ---------------------------------------------------------------------------------------

class _Layout:
    """Where a run's files go under OUT."""

    def __init__(self, out: str, name: str) -> None:
        self.out = out.rstrip("/")
        self.run = join(out, "run.json")
        self.predictions = join(out, "predictions")
        self.parts = join(out, "parts")
        self.png_dir = join(out, f"panoptic_{name}")
        self.panoptic = join(out, f"panoptic_{name}.json")
        self.results = join(out, f"instances_{name}_results.json")
        self.errors = join(out, "errors.parquet")
        self.categories = join(out, "categories.json")
        self.summary = join(out, "summary.json")

    def parquet(self, index: int) -> str:
        return join(self.predictions, f"part-{index:05d}.parquet")

    def part(self, index: int) -> str:
        return join(self.parts, f"part-{index:05d}.json")


def _identity(config: InferConfig, shards: list[Shard]) -> dict:
    """What determines the outputs; a rerun into the same OUT must match it to resume."""
    settings = asdict(config.settings)
    settings.pop("device")
    if family(config.model).kind != PROPOSALS:
        settings.pop("proposals")  # only a proposal generator reads them (and runs before them still resume)
    identity = {"format": FORMAT_VERSION, "input": absolute(config.input), "model": config.model, "settings": settings,
                "name": config.name, "batch_size": config.batch_size, "image_info": config.image_info,
                **({"flip_check": True} if config.flip_check else {}),  # runs before the option still resume
                "shards": hashlib.sha256(json.dumps([asdict(s) for s in shards]).encode()).hexdigest()}
    return json.loads(json.dumps(identity))  # as run.json will hold it (tuples become lists)


def _start_or_resume(layout: _Layout, identity: dict) -> None:
    fs, path = url_to_fs(layout.run)
    if fs.exists(path):
        previous = read_json(layout.run)
        if {k: v for k, v in previous.items() if k != "run_id"} != identity:
            changed = sorted(k for k in identity if previous.get(k) != identity[k])
            raise SegpipeError(f"{layout.out}: holds a run with other {', '.join(changed)}; "
                               "use another --out, or delete it to start over")
        return
    write_json(layout.run, {**identity, "run_id": hashlib.sha256(json.dumps(identity).encode()).hexdigest()[:16]})


def _resources(config: InferConfig) -> tuple[float, int]:
    """(CPUs per actor, torch threads per actor), or a clear error for a request the cluster cannot meet."""
    import ray

    cluster = ray.cluster_resources()
    cpus, gpus = cluster.get("CPU", 0.0), cluster.get("GPU", 0.0)
    if config.actors * config.gpus_per_actor > gpus:
        raise SegpipeError(f"--actors {config.actors} x --gpus-per-actor {config.gpus_per_actor:g} needs "
                           f"{config.actors * config.gpus_per_actor:g} GPUs; the cluster has {gpus:g}")
    per_actor = config.cpus_per_actor
    if per_actor is None:
        per_actor = (cpus - 2 * TASK_CPUS) / config.actors  # what reading and post-processing leave
        if config.gpus_per_actor > 0:
            per_actor = min(per_actor, 1.0)  # an actor that feeds a GPU needs one CPU at most
    if per_actor < 0.25 or config.actors * per_actor + 2 * TASK_CPUS > cpus:
        raise SegpipeError(f"--actors {config.actors} do not fit on {cpus:g} CPUs: {config.actors} x {per_actor:g} "
                           f"CPU (at least 0.25 each) + {2 * TASK_CPUS:g} for reading and post-processing")
    return per_actor, max(1, int(per_actor))


def _image_info(uri: str | None) -> dict | None:
    if uri is None:
        return None
    data = read_json(uri)
    images = data.get("images") if isinstance(data, dict) else None
    if not isinstance(images, list):
        raise SegpipeError(f"{uri}: not a COCO file (no 'images' list)")
    return {im["file_name"]: (int(im["id"]), (im.get("height"), im.get("width")) if "height" in im else None)
            for im in images}


def run(config: InferConfig, progress: Progress = quiet) -> Summary:
    """Label every image under `config.input`; resumes a run that `config.out` already holds."""
    if config.batch_size < 1 or config.actors < 1 or config.gpus_per_actor < 0:
        raise SegpipeError("--batch-size and --actors must be at least 1, --gpus-per-actor at least 0")
    check_model_name(config.model)
    if config.settings.weights is not None:
        from pipeline.models import load_model

        model = load_model(config.model, config.settings)  # a checkpoint that does not fit fails here, before Ray
        categories, panoptic = model.categories, model.panoptic
        del model
    else:
        categories, panoptic = describe(config.model, config.settings)
    shards = list(config.shards) if config.shards is not None else list_shards(config.input, config.files_per_shard)
    layout = _Layout(config.out, config.name)
    _start_or_resume(layout, _identity(config, shards))
    fs, _ = url_to_fs(layout.out)
    todo = [i for i in range(len(shards)) if not fs.exists(url_to_fs(layout.part(i))[1])]
    summary = Summary(shards=len(shards), shards_resumed=len(shards) - len(todo))
    start = time.perf_counter()
    if todo:
        progress(f"{len(todo)} of {len(shards)} shards to label"
                 + (f" ({summary.shards_resumed} committed by an earlier run)" if summary.shards_resumed else ""))
        _label(config, shards, todo, layout, panoptic, summary, progress)
    else:
        progress(f"all {len(shards)} shards committed by an earlier run; merging")
    write_start = time.perf_counter()
    _merge(layout, len(shards), categories, panoptic, summary)
    summary.stage_s["write"] += time.perf_counter() - write_start
    summary.wall_s = time.perf_counter() - start
    summary.images_per_s = summary.images / summary.wall_s if summary.wall_s else 0.0
    write_json(layout.summary, asdict(summary))
    return summary


def _label(config: InferConfig, shards: list[Shard], todo: list[int], layout: _Layout, panoptic: bool,
           summary: Summary, progress: Progress) -> None:
    import logging

    import ray
    import ray.data

    connect_start = time.perf_counter()
    started = connect(config.address)
    summary.ray_s = time.perf_counter() - connect_start
    try:
        actor_cpus, threads = _resources(config)
        logging.getLogger("ray.data").setLevel(logging.ERROR)  # our progress lines replace Ray Data's
        # Ray Data's settings for this run only (the context is process-wide): restored in `finally`.
        context = ray.data.DataContext.get_current()
        overrides = {
            "enable_progress_bars": False, "print_on_execution_start": False, "enable_auto_log_stats": False,
            # Every row is one block, so a row moves on to the actor (and from it to post-processing) as
            # soon as it is ready, not when its block fills up.
            "target_max_block_size": 1,
            # Start every actor before the first row: a model that cannot load fails the run at once, a
            # pool the cluster cannot place (an autoscaler that never delivers) fails after this long instead
            # of hanging, and the rows are spread over all actors from the start.
            "wait_for_min_actors_s": ACTOR_START_TIMEOUT_S,
        }
        saved = {name: getattr(context, name) for name in overrides}
        for name, value in overrides.items():
            setattr(context, name, value)
        dataset = (
            ray.data.from_items([{"shard": i} for i in todo], override_num_blocks=len(todo))
            .flat_map(_read, fn_kwargs={"shards": shards, "batch_size": config.batch_size,
                                        "image_info": _image_info(config.image_info)}, num_cpus=TASK_CPUS)
            .map_batches(_Predictor, fn_constructor_kwargs={"model": config.model, "settings": config.settings,
                                                            "threads": threads, "batch_size": config.batch_size,
                                                            "flip": config.flip_check},
                         batch_size=1, compute=ray.data.ActorPoolStrategy(size=config.actors), num_cpus=actor_cpus,
                         num_gpus=config.gpus_per_actor or None, batch_format="numpy", zero_copy_batch=True)
            # One row per task: a shard commits as soon as its last row is through, not when a bundle is.
            .map_batches(_postprocess, fn_kwargs={"png_dir": layout.png_dir if panoptic else None}, batch_size=1,
                         batch_format="numpy", num_cpus=TASK_CPUS)
        )
        blocks = dataset.iter_batches(batch_size=None, prefetch_batches=0, batch_format="numpy")  # as they come
        rows = ({key: block[key][i] for key in block} for block in blocks for i in range(len(block["shard"])))
        try:
            _collect(rows, config, shards, layout, panoptic, summary, progress, len(todo))
        except (ray.exceptions.RayError, ray.exceptions.GetTimeoutError) as error:
            raise _ray_failure(error) from None
        finally:
            for name, value in saved.items():
                setattr(context, name, value)
    finally:
        if started:
            stop_start = time.perf_counter()
            ray.shutdown()
            summary.ray_s += time.perf_counter() - stop_start


def _ray_failure(error: Exception) -> SegpipeError:
    """One line for a failure inside Ray: a SegpipeError raised in a worker keeps its own message; a crash is
    WorkFailed (exit 1), not bad input."""
    text = str(error)
    for line in text.splitlines():
        if "SegpipeError: " in line:
            return SegpipeError(line.split("SegpipeError: ", 1)[1].strip())
    if isinstance(error, TimeoutError) or "Timed out while starting actors" in text:
        return SegpipeError(f"the model actors did not start within {ACTOR_START_TIMEOUT_S} s; the cluster may lack "
                            "the CPUs, GPUs or memory they ask for")
    last = [line for line in text.splitlines() if line.strip()][-1:] or [type(error).__name__]
    return WorkFailed(f"inference failed on the cluster: {last[0].strip()}")


def _collect(rows: Iterator[dict], config: InferConfig, shards: list[Shard], layout: _Layout, panoptic: bool,
             summary: Summary, progress: Progress, total: int) -> None:
    """Gather each shard's rows; commit a shard as soon as all of them are in."""
    run_id = read_json(layout.run)["run_id"]
    pending: dict[int, dict[int, dict]] = {}
    sizes: dict[int, int] = {}
    actors: dict[int, dict] = {}
    committed, last_report, start = 0, time.perf_counter(), time.perf_counter()
    first_commit: tuple[float, int] | None = None
    progress(f"shards 0/{total}", 0, total)
    for row in rows:
        index, chunk = int(row["shard"]), pickle.loads(row["payload"])
        pending.setdefault(index, {})[int(row["chunk"])] = chunk
        if row["final"]:
            sizes[index] = int(row["chunk"]) + 1
        for stage, seconds in (("decode", chunk.decode_s), ("model", chunk.model_s), ("postprocess", chunk.post_s)):
            summary.stage_s[stage] += seconds
        if chunk.actor is not None:
            actor = actors.setdefault(chunk.actor.pid, {**asdict(chunk.actor), "images": 0})
            actor["images"] += sum(item.error is None for item in chunk.items)
        if sizes.get(index) == len(pending[index]):
            write_start = time.perf_counter()
            chunks = pending.pop(index)
            items = [item for k in sorted(chunks) for item in chunks[k].items]
            _commit(layout, index, shards[index], items, run_id, config.model, panoptic)
            summary.stage_s["write"] += time.perf_counter() - write_start
            committed += 1
            summary.images += sum(item.error is None for item in items)
            summary.failed += sum(item.error is not None for item in items)
            now = time.perf_counter()
            if first_commit is None:
                first_commit = (now, summary.images)
            elif now > first_commit[0]:
                summary.steady_images_per_s = (summary.images - first_commit[1]) / (now - first_commit[0])
            if now - last_report > 5 or committed == total:  # a line every 5 s in a log
                last_report = now
                rate = summary.images / (now - start)
                progress(f"shards {committed}/{total}, {summary.images} images ({rate:.1f}/s), "
                         f"{summary.failed} failed", committed, total)
    if pending:
        raise RuntimeError(f"shards {sorted(pending)} ended incomplete")  # a bug, not a user error
    summary.actors = sorted(actors.values(), key=lambda a: a["pid"])


def _commit(layout: _Layout, index: int, shard: Shard, items: list[Item], run_id: str, model: str,
            panoptic: bool) -> None:
    """Write shard `index`: its Parquet part, then its fragment, whose presence marks the shard done."""
    labelled = [item for item in items if item.prediction is not None]
    predictions = [item.prediction for item in labelled]
    write_predictions(layout.parquet(index), predictions, run_id, model)
    fragment = {
        "shard": asdict(shard),
        "images": [{"id": item.image_id, "file_name": item.key, "height": int(item.height), "width": int(item.width)}
                   for item in labelled],
        "annotations": [{"image_id": item.image_id, "file_name": png_name(item.key),
                         "segments_info": [s.segment_info() for s in item.prediction.segments]}
                        for item in labelled] if panoptic else [],
        "errors": [{"image": item.key, "shard": shard.uri, "reason": item.error} for item in items if item.error is not None],
        "segments": sum(len(p.segments) for p in predictions),
    }
    write_json(layout.part(index), fragment)


ERRORS_SCHEMA = pa.schema([("image", pa.string()), ("shard", pa.string()), ("reason", pa.string())])


def _merge(layout: _Layout, count: int, categories: list[dict], panoptic: bool, summary: Summary) -> None:
    """The run's exports from its committed parts, in shard order."""
    images, annotations, errors, seen, pngs = [], [], [], {}, {}
    segments = 0
    for index in range(count):
        fragment = read_json(layout.part(index))
        for image in fragment["images"]:
            if image["id"] in seen:
                raise SegpipeError(f"image id {image['id']} is given to both {seen[image['id']]} and "
                                   f"{image['file_name']}; name images uniquely or pass --image-info")
            seen[image["id"]] = image["file_name"]
        for annotation in fragment["annotations"]:
            if annotation["file_name"] in pngs:
                raise SegpipeError(f"images {pngs[annotation['file_name']]} and {seen[annotation['image_id']]} "
                                   f"both make {annotation['file_name']}; name images uniquely")
            pngs[annotation["file_name"]] = seen[annotation["image_id"]]
        images += fragment["images"]
        annotations += fragment["annotations"]
        errors += fragment["errors"]
        segments += fragment["segments"]
    summary.images, summary.failed, summary.segments = len(images), len(errors), segments
    thing_ids = {c["id"] for c in categories if c["isthing"]}
    results = [r for index in range(count) for p in read_predictions([layout.parquet(index)])
               for r in p.to_coco_results() if r["category_id"] in thing_ids]
    write_json(layout.results, results)
    write_json(layout.categories, categories)  # what the table's category ids mean, for readers such as `segpipe train`
    summary.outputs = {"predictions": layout.predictions, "instances_results": layout.results}
    if panoptic:
        write_json(layout.panoptic, {"info": {"description": "segpipe infer"}, "images": images,
                                     "annotations": annotations, "categories": categories})
        summary.outputs.update(panoptic=layout.panoptic, panoptic_pngs=layout.png_dir)
    table = pa.Table.from_pylist(errors, schema=ERRORS_SCHEMA)
    buffer = pa.BufferOutputStream()
    pq.write_table(table, buffer)
    write_bytes(layout.errors, buffer.getvalue().to_pybytes())
    summary.outputs.update(errors=layout.errors, summary=layout.summary)
