"""`segpipe train`: data-parallel training on Ray Train's TorchTrainer, checkpoints a resumed run continues from."""

from __future__ import annotations

import hashlib
import json
import math
import os
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import asdict, dataclass, replace
from importlib.metadata import version

from fsspec.implementations.local import LocalFileSystem

from pipeline.errors import SegpipeError, WorkFailed
from pipeline.fusion import FusionConfig
from pipeline.io.fs import absolute, join, read_json, url_to_fs, write_bytes, write_json
from pipeline.models import PANOPTIC, check_model_name, family
from pipeline.models.base import ModelSettings
from pipeline.progress import Progress, quiet
from pipeline.train.data import check_categories, check_images, load_dataset
from pipeline.train.worker import MODEL_FILE, Plan

FORMAT_VERSION = 1
RUNTIME_ENV = {"env_vars": {"RAY_TRAIN_ENABLE_PRINT_PATCH": "0"},
               "worker_process_setup_hook": "pipeline.train.worker.quiet_logs"}
"""What training asks of the Ray it starts (a Ray started for it beforehand needs the same): Ray Train's print
patch off (with `segpipe --verbose`, workers' output reaches this terminal as printed), the workers' log noise
silenced."""


@dataclass(frozen=True)
class TrainConfig:
    train: str
    """Training labels: COCO panoptic or instances JSON, or a `segpipe infer` output folder (pseudo-labels)."""
    val: str
    """Validation labels, in the same forms."""
    model: str
    out: str
    """Run folder (any fsspec URI): train.json, checkpoints/, model.pt, metrics.json."""
    init: str | None = None
    """Checkpoint to start from; None: a random initialisation seeded by `seed`."""
    train_images: str | None = None
    """Where --train's images are (default: COCO's layout, or the infer run's input)."""
    val_images: str | None = None
    more_train: tuple[str, ...] = ()
    """More human labels beside `train`, in the same stream (COCO JSON in COCO's layout, or folders in the
    predictions-table layout such as `segpipe review import` writes)."""
    pseudo: tuple[str, ...] = ()
    """Pseudo-label sources trained on beside `train` (`segpipe infer` or `segpipe filter` output folders)."""
    pseudo_ratio: float | None = None
    """The share of every batch drawn from `pseudo`; None: one stream over all examples alike."""
    workers: int = 1
    """Ray Train workers (DDP)."""
    gpus_per_worker: float = 0
    steps: int | None = None
    """Optimiser steps; give this or `epochs`."""
    epochs: float | None = None
    batch_size: int = 8
    """Images per step over all workers."""
    learning_rate: float | None = None
    """Peak learning rate; None: the model's (Objective.learning_rate)."""
    warmup: int = 20
    """Steps of linear warm-up."""
    seed: int = 0
    """Seeds the initialisation, the data order and the flips."""
    checkpoint_every: int | None = None
    """Validate and checkpoint every this many steps; None: 5 times a run."""
    log_every: int = 10
    settings: ModelSettings = ModelSettings(fusion=replace(FusionConfig(), stuff_area_threshold=64))
    """Model build and post-processing settings; validation uses its thresholds, as infer would."""
    resume: bool = False
    """Continue the run OUT holds from its latest checkpoint."""
    address: str | None = None
    """Ray cluster to join; None: a local one for this run."""


@dataclass
class TrainResult:
    model: str  # URI of model.pt
    steps: int
    history: list[dict]


def run(config: TrainConfig, progress: Progress = quiet) -> TrainResult:
    """Train `config.model` on `config.train`, validating on `config.val`; OUT gets checkpoints/, model.pt,
    train.json (what the run is) and metrics.json (validation after each checkpoint)."""
    from pipeline.models import load_model
    from pipeline.train.objectives import objective_for

    check_model_name(config.model)
    # Local paths made absolute: Ray Train runs each worker in a folder of its own.
    config = replace(config, **{k: absolute(v) for k in ("train", "val", "out", "init", "train_images", "val_images")
                                if (v := getattr(config, k)) is not None}, pseudo=tuple(absolute(p) for p in config.pseudo),
                     more_train=tuple(absolute(p) for p in config.more_train))
    if config.pseudo_ratio is not None and not (config.pseudo and 0 <= config.pseudo_ratio <= 1):
        raise SegpipeError("--pseudo-ratio: needs --pseudo, and lies in [0, 1]")
    if config.workers < 1 or config.batch_size < 1:
        raise SegpipeError("--workers and --batch-size must be at least 1")
    if config.batch_size % config.workers:
        raise SegpipeError(f"--batch-size {config.batch_size} does not split over --workers {config.workers}: "
                           "use a multiple of the worker count")
    if (config.steps is None) == (config.epochs is None):
        raise SegpipeError("give one of --steps and --epochs")
    train = load_dataset(config.train, config.train_images)
    val = load_dataset(config.val, config.val_images)
    more_train = tuple(load_dataset(uri) for uri in config.more_train)
    pseudo = tuple(load_dataset(uri) for uri in config.pseudo)
    for dataset in (train, *more_train, val, *pseudo):
        check_images(dataset)
    for dataset in (train, *more_train, *pseudo):
        if family(config.model).kind == PANOPTIC and dataset.kind == "instances":
            raise SegpipeError(f"{dataset.uri}: COCO instances labels; {config.model} learns panoptic labels (things "
                               "and stuff): give a COCO panoptic file or a panoptic model's predictions")
    settings = replace(config.settings, weights=config.init, random_weights=config.init is None, seed=config.seed,
                       categories=tuple(train.categories) if config.init is None else None)
    adapter = load_model(config.model, settings)  # an unreadable or unfitting --init fails here, before Ray
    objective = objective_for(adapter)
    for dataset in (train, *more_train, *pseudo):
        if dataset.kind == "predictions" and not objective.ignores_unlabelled:
            raise SegpipeError(f"{dataset.uri}: partial labels (pseudo-labels or reviewed masks); {config.model} would "
                               "learn the objects they leave out (rejected or missed) as background: train "
                               "segpipe_small on them, or give complete human labels")
    for dataset in (train, *more_train, val, *pseudo):
        check_categories(dataset, adapter.categories, f"{config.model}" + (f" (from {config.init})" if config.init else ""),
                         objective.things_only)
    human = len(train.examples) + sum(len(d.examples) for d in more_train)
    examples = human + sum(len(d.examples) for d in pseudo)
    steps = config.steps if config.steps is not None else math.ceil(config.epochs * examples / config.batch_size)
    if steps < 1:
        raise SegpipeError("--steps / --epochs give no training step")
    identity = {"format": FORMAT_VERSION, "model": config.model, "init": config.init,
                "train": {"uri": config.train, "images": train.images, "fingerprint": train.fingerprint},
                "val": {"uri": config.val, "images": val.images, "fingerprint": val.fingerprint},
                "steps": steps, "batch_size": config.batch_size,
                "learning_rate": config.learning_rate or objective.learning_rate, "warmup": min(config.warmup, steps),
                "seed": config.seed, "checkpoint_every": config.checkpoint_every or max(1, math.ceil(steps / 5)),
                "settings": {k: v for k, v in asdict(settings).items() if k not in ("device", "categories", "proposals")}}
    if more_train:  # (absent otherwise, so earlier runs still resume)
        identity["more_train"] = [{"uri": d.uri, "images": d.images, "fingerprint": d.fingerprint} for d in more_train]
    if pseudo:  # (absent otherwise, so runs from before pseudo-labels still resume)
        identity["pseudo"] = [{"uri": d.uri, "images": d.images, "fingerprint": d.fingerprint} for d in pseudo]
        identity["pseudo_ratio"] = config.pseudo_ratio
    identity = json.loads(json.dumps(identity))
    out = config.out.rstrip("/")
    new_run = _check_out(out, identity, config.resume)
    metadata = {"data": {"train": train.fingerprint, "val": val.fingerprint,
                         **({"more_train": [d.fingerprint for d in more_train]} if more_train else {}),
                         **({"pseudo": [d.fingerprint for d in pseudo]} if pseudo else {})},
                "code_version": version("segpipe"),
                "run_id": hashlib.sha256(json.dumps(identity).encode()).hexdigest()[:16],
                "settings": identity["settings"], "batch_size": config.batch_size}
    plan = Plan(model=config.model, settings=settings, train=train, val=val, steps=steps, batch_size=config.batch_size,
                learning_rate=identity["learning_rate"], warmup=identity["warmup"], seed=config.seed,
                checkpoint_every=identity["checkpoint_every"], log_every=config.log_every, threads=1, metadata=metadata,
                more_train=more_train, pseudo=pseudo, pseudo_ratio=config.pseudo_ratio)
    del adapter, objective
    progress(f"training {config.model} for {steps} steps (batch {config.batch_size} over {config.workers} "
             f"workers) on {human} images"
             + (f" and {examples - human} pseudo-labelled ones" if pseudo else "")
             + (f" ({plan.pseudo_ratio:g} of each batch)" if pseudo and plan.pseudo_ratio is not None else "")
             + f"; validating on {len(val.examples)} every "
             f"{plan.checkpoint_every} steps")
    _fit(config, plan, out, identity if new_run else None, progress)
    history = read_json(join(out, "metrics.json"))["history"]
    return TrainResult(model=join(out, MODEL_FILE), steps=steps, history=history)


def _check_out(out: str, identity: dict, resume: bool) -> bool:
    """Whether OUT can take this run (refused with one line if not); True when it is a new run."""
    fs, path = url_to_fs(join(out, "train.json"))
    if fs.exists(path):
        previous = read_json(join(out, "train.json"))
        if not resume:
            raise SegpipeError(f"{out}: holds a training run; pass --resume to continue it, or use another --out")
        if previous != identity:
            changed = sorted(k for k in identity if previous.get(k) != identity[k])
            raise SegpipeError(f"{out}: holds a run with other {', '.join(changed)}; it cannot be resumed with these")
        return False
    if resume:
        raise SegpipeError(f"{out}: no training run to resume (no train.json)")
    return True


def _fit(config: TrainConfig, plan: Plan, out: str, identity: dict | None, progress: Progress) -> None:
    """Run the TorchTrainer (a new run writes `identity` to train.json first); OUT gets the last
    checkpoint's model.pt and the validation history. Rank 0's progress reaches `progress` through a queue."""
    import io

    import ray
    import torch
    from pyarrow.fs import FSSpecHandler, PyFileSystem
    from ray.train import CheckpointConfig, FailureConfig, LoggingConfig, RunConfig, ScalingConfig
    from ray.train.torch import TorchTrainer
    from ray.util.queue import Queue

    from pipeline.cluster import connect

    started = connect(config.address, runtime_env=RUNTIME_ENV)
    try:
        resources = ray.cluster_resources()
        cpus, gpus = resources.get("CPU", 0.0), resources.get("GPU", 0.0)
        if config.workers * config.gpus_per_worker > gpus:
            raise SegpipeError(f"--workers {config.workers} x --gpus-per-worker {config.gpus_per_worker:g} needs "
                               f"{config.workers * config.gpus_per_worker:g} GPUs; the cluster has {gpus:g}")
        per_worker = math.floor(cpus / config.workers)
        if per_worker < 1:
            raise SegpipeError(f"--workers {config.workers} do not fit on {cpus:g} CPUs (each needs 1)")
        if identity is not None:  # after every check: a refused run leaves OUT untouched
            write_json(join(out, "train.json"), identity)
        updates = Queue(actor_options={"num_cpus": 0})  # beside the workers, taking none of their CPUs
        plan = replace(plan, updates=updates, threads=per_worker, settings=replace(
            plan.settings, device="cuda" if config.gpus_per_worker > 0 else "cpu"))
        fs, path = url_to_fs(out)
        storage = ({"storage_path": os.path.abspath(path)} if isinstance(fs, LocalFileSystem)
                   else {"storage_path": path, "storage_filesystem": PyFileSystem(FSSpecHandler(fs))})
        trainer = TorchTrainer(
            _loop, train_loop_config={"plan": plan},
            scaling_config=ScalingConfig(num_workers=config.workers, use_gpu=config.gpus_per_worker > 0,
                                         resources_per_worker={"CPU": per_worker,
                                                               **({"GPU": config.gpus_per_worker}
                                                                  if config.gpus_per_worker else {})}),
            run_config=RunConfig(name="checkpoints", **storage, checkpoint_config=CheckpointConfig(num_to_keep=2),
                                 failure_config=FailureConfig(max_failures=0),
                                 logging_config=LoggingConfig(log_level="WARNING")))
        try:
            with _relayed(updates, progress):
                result = trainer.fit()
        except ray.train.TrainingFailedError as error:
            raise _worker_error(error) from None
        if result.checkpoint is None:
            raise SegpipeError(f"{out}: training ended without a checkpoint")
        with result.checkpoint.as_directory() as folder:
            with open(os.path.join(folder, MODEL_FILE), "rb") as f:
                data = f.read()
        write_bytes(join(out, MODEL_FILE), data)
        history = torch.load(io.BytesIO(data), map_location="cpu", weights_only=True)["history"]
        write_json(join(out, "metrics.json"), {"history": history})
    finally:
        if started:
            ray.shutdown()


@contextmanager
def _relayed(updates, progress: Progress) -> Iterator[None]:
    """Pass the (what, done, total) reports the workers put on `updates` to `progress` while the block runs."""
    from ray.util.queue import Empty

    stop = threading.Event()

    def relay() -> None:
        while True:
            try:
                progress(*updates.get(timeout=0.5))
            except Empty:
                if stop.is_set():
                    return

    thread = threading.Thread(target=relay, name="segpipe-train-progress", daemon=True)
    thread.start()
    try:
        yield
    finally:
        stop.set()
        thread.join()


def _loop(config: dict) -> None:
    from pipeline.train.worker import train_loop

    train_loop(config["plan"])


def _worker_error(error: Exception) -> SegpipeError:
    """One line for a failed run: a worker's SegpipeError as it is, anything else (a crash: WorkFailed, exit 1)
    by type and message."""
    failures = getattr(error, "worker_failures", None) or {}
    for failure in failures.values():
        seen = failure
        while seen is not None:
            if isinstance(seen, SegpipeError):
                return SegpipeError(str(seen))
            seen = getattr(seen, "cause", None) or seen.__cause__
    first = next(iter(failures.values()), error)
    for line in str(first).splitlines():
        if "SegpipeError: " in line:
            return SegpipeError(line.split("SegpipeError: ", 1)[1].strip())
    lines = [line for line in str(first).strip().splitlines() if line.strip()]
    return WorkFailed(f"training failed: {lines[-1] if lines else type(first).__name__}")
