"""`segpipe demo`: the whole pipeline on synthetic data in one process, each step timed, ending in a table of results.

    synthesise train (tar shards too), val and an unlabeled pool -> validate the ground truth -> train segpipe_small
    -> label val -> evaluate PQ and AP -> one data-engine round on the pool -> the report of val

One local Ray serves the stages that use Ray (train, label, the engine), started once instead of once a stage.
"""

from __future__ import annotations

import json
import os
import shutil
import sys
import time
from contextlib import redirect_stdout
from dataclasses import asdict, dataclass, field
from pathlib import Path

from pipeline.errors import SegpipeError
from pipeline.progress import Progress, quiet

MODEL = "segpipe_small"
MARKER = "demo.json"
"""Written first into OUT: `--force` replaces only a folder that holds it (an earlier demo's)."""


@dataclass(frozen=True)
class DemoSettings:
    """How much the demo synthesises and trains, and what its engine round keeps."""

    train: int = 200
    """Training images (also written as tar shards of `shard_size`)."""
    shard_size: int = 50
    val: int = 50
    """Validation images: labelled by the trained model, evaluated, reported; the engine's held-out set."""
    pool: int = 200
    """Unlabeled images the engine round pseudo-labels."""
    size: int = 256
    """Image side in pixels."""
    steps: int = 200
    """Training steps of the first model (batch 8)."""
    checkpoint_every: int = 50
    engine_steps: int = 100
    """Retraining steps of the engine round, from the first model, on train + kept pseudo-labels."""
    min_score: float = 0.5
    """The engine round's filter: pseudo-labels scoring at least this (the engine's default)..."""
    min_stability: float | None = 0.9
    """... and this stable (the engine's default); None: no stability rule."""


SMALL = DemoSettings(train=16, shard_size=8, val=8, pool=16, size=128, steps=20, checkpoint_every=20, engine_steps=10,
                     min_score=0.1, min_stability=None)
"""A quick run (`--small`): every step and file, numbers that mean little (the filter loose enough for a model
trained 20 steps, whose soft masks are not yet stable, to keep some pseudo-labels)."""


@dataclass(frozen=True)
class Step:
    """One timed step of the demo: what it found, and where it wrote."""

    name: str
    seconds: float
    result: str
    outputs: tuple[str, ...] = ()


@dataclass
class DemoSummary:
    """What the demo did: its steps in order, and the key numbers as pq.json, ap.json and the engine's manifests
    hold them."""

    out: str
    steps: list[Step] = field(default_factory=list)
    seconds: float = 0.0
    images: dict[str, int] = field(default_factory=dict)
    pq: float | None = None
    ap: float | None = None
    engine_pq_before: float | None = None
    engine_pq_after: float | None = None
    promoted: bool | None = None
    report: str | None = None
    problems: list[str] = field(default_factory=list)
    """Findings that make the run exit 1: invalid files, images that could not be labelled."""


def prepare(out: str, force: bool) -> None:
    """Refuse a non-empty OUT unless `force`, and then only an earlier demo's (one line); leave OUT empty."""
    folder = Path(out)
    if folder.exists() and not folder.is_dir():
        raise SegpipeError(f"{out}: is a file; the demo writes a folder")
    if folder.exists() and any(folder.iterdir()):
        if not force:
            raise SegpipeError(f"{out}: not empty; pass --force to replace an earlier demo's output, or use another "
                               "--out")
        if not (folder / MARKER).is_file():
            raise SegpipeError(f"{out}: holds files that are not a segpipe demo's (no {MARKER}); not deleting them: "
                               "use another --out")
        shutil.rmtree(folder)
    folder.mkdir(parents=True, exist_ok=True)


def run(out: str, progress: Progress = quiet, settings: DemoSettings = DemoSettings()) -> DemoSummary:
    """Run every step into the (empty) folder OUT; OUT/demo.json gets the summary."""
    import ray

    root = Path(out)
    summary = DemoSummary(out=out)
    (root / MARKER).write_text(json.dumps({"settings": asdict(settings)}))
    plan = [("synthesise", _synthesise), ("validate", _validate), ("start Ray", _start_ray), ("train", _train),
            ("label", _label), ("evaluate PQ", _evaluate_pq), ("evaluate AP", _evaluate_ap), ("engine round", _engine),
            ("stop Ray", _stop_ray), ("report", _report)]
    start = time.perf_counter()
    # Stages' own prints (with `segpipe --verbose`, Ray forwards the training workers' lines to stdout) go to stderr
    # with the progress: stdout keeps the closing table alone.
    with redirect_stdout(sys.stderr):
        try:
            for number, (name, step) in enumerate(plan, 1):
                progress(f"demo {number}/{len(plan)}: {name}")
                step_start = time.perf_counter()
                result, *outputs = step(root, settings, summary, _indented(progress))
                seconds = time.perf_counter() - step_start
                summary.steps.append(Step(name, round(seconds, 1), result, tuple(outputs)))
                progress(f"  {name} done in {seconds:.1f} s: {result}")
        finally:
            ray.shutdown()
    summary.seconds = time.perf_counter() - start
    (root / MARKER).write_text(json.dumps({"settings": asdict(settings), **asdict(summary)}, indent=1))
    return summary


def _indented(progress: Progress) -> Progress:
    """A step's own progress, indented under the demo's line for the step."""
    return lambda what, done=None, total=None: progress(f"  {what}", done, total)


def _start_ray(root: Path, settings: DemoSettings, summary: DemoSummary, progress: Progress):
    """A local Ray that train, label and the engine join (each would otherwise start and stop its own), with the
    settings training asks for."""
    from pipeline.cluster import connect
    from pipeline.train import RUNTIME_ENV

    connect(None, runtime_env=RUNTIME_ENV)
    return ("local, shared by train, label and the engine round",)


def _stop_ray(root: Path, settings: DemoSettings, summary: DemoSummary, progress: Progress):
    import ray

    ray.shutdown()
    return ("the report runs in this process",)


def _synthesise(root: Path, settings: DemoSettings, summary: DemoSummary, progress: Progress):
    from pipeline.synth import SynthConfig, write_dataset

    splits = (("train", settings.train, 0, settings.shard_size), ("val", settings.val, 1, None),
              ("pool", settings.pool, 2, None))
    for split, images, seed, shard_size in splits:
        counts = write_dataset(str(root), SynthConfig(images=images, split=split, seed=seed, height=settings.size,
                                                      width=settings.size, shard_size=shard_size,
                                                      workers=os.cpu_count() or 1))
        summary.images[split] = counts["images"]
        progress(f"{split}: {counts['images']} images, {counts['segments']} panoptic segments"
                 + (f", {counts['shards']} tar shards" if shard_size else ""))
    shards = len(list((root / "shards").glob("train-*.tar")))
    return (f"train {summary.images['train']} ({shards} tar shards), val {summary.images['val']}, "
            f"pool {summary.images['pool']} images", "annotations/", "train/", "shards/", "val/", "pool/")


def _check(summary: DemoSummary, uri: str, images: str | None = None) -> str:
    """`segpipe validate` of one file: its problems join the summary's; returns its verdict."""
    from pipeline.validate import validate

    report = validate(uri, images_folder=images)
    summary.problems.extend(str(problem) for problem in report.problems)
    return f"{len(report.problems)} problems" if report.problems else "valid"


def _validate(root: Path, settings: DemoSettings, summary: DemoSummary, progress: Progress):
    verdicts = [f"{kind} {_check(summary, str(root / 'annotations' / f'{kind}_val.json'), str(root / 'val'))}"
                for kind in ("panoptic", "instances")]
    return ("val: " + ", ".join(verdicts),)


def _train(root: Path, settings: DemoSettings, summary: DemoSummary, progress: Progress):
    from pipeline.train import TrainConfig
    from pipeline.train import run as train

    result = train(TrainConfig(train=str(root / "annotations" / "panoptic_train.json"),
                               val=str(root / "annotations" / "panoptic_val.json"), model=MODEL,
                               out=str(root / "model"),
                               steps=settings.steps, checkpoint_every=settings.checkpoint_every), progress=progress)
    last = result.history[-1]
    return (f"{result.steps} steps; val PQ {last['pq']:.4f}, AP {last['ap']:.4f}", "model/model.pt",
            "model/metrics.json")


def _label(root: Path, settings: DemoSettings, summary: DemoSummary, progress: Progress):
    from pipeline.infer import InferConfig
    from pipeline.infer import run as infer
    from pipeline.models import ModelSettings
    from pipeline.models.base import with_checkpoint_settings

    labels = root / "labels-val"
    model = with_checkpoint_settings(ModelSettings(weights=str(root / "model" / "model.pt")), MODEL, {})
    done = infer(InferConfig(input=str(root / "val"), out=str(labels), model=MODEL, settings=model), progress)
    if done.failed:
        summary.problems.append(f"{done.failed} images could not be labelled; see {done.outputs['errors']}")
    verdict = _check(summary, str(labels / "panoptic_pred.json"))
    return (f"{done.images} images, {done.segments} segments, {done.failed} failed; panoptic_pred.json {verdict}",
            "labels-val/predictions/", "labels-val/panoptic_pred.json", "labels-val/instances_pred_results.json")


def _evaluate_pq(root: Path, settings: DemoSettings, summary: DemoSummary, progress: Progress):
    from pipeline.evaluate.pq import evaluate_pq
    from pipeline.io.fs import write_json

    result = evaluate_pq(str(root / "annotations" / "panoptic_val.json"),
                         str(root / "labels-val" / "panoptic_pred.json"))
    write_json(str(root / "labels-val" / "pq.json"), result)
    summary.pq = result["All"]["pq"]
    return (f"PQ {summary.pq:.4f} (things {result['Things']['pq']:.4f}, stuff {result['Stuff']['pq']:.4f})",
            "labels-val/pq.json")


def _evaluate_ap(root: Path, settings: DemoSettings, summary: DemoSummary, progress: Progress):
    from pipeline.evaluate.ap import evaluate_ap
    from pipeline.io.fs import write_json

    result = evaluate_ap(str(root / "annotations" / "instances_val.json"),
                         str(root / "labels-val" / "instances_pred_results.json"))
    write_json(str(root / "labels-val" / "ap.json"), result)
    summary.ap = result["stats"][0]
    return f"mask AP {summary.ap:.4f} (AP50 {result['stats'][1]:.4f})", "labels-val/ap.json"


def _engine(root: Path, settings: DemoSettings, summary: DemoSummary, progress: Progress):
    import yaml

    from pipeline import engine

    job = {"kind": "engine", "out": "engine", "model": MODEL, "start": "model/model.pt",
           "labeled": "annotations/panoptic_train.json",
           "unlabeled": "pool", "heldout": "annotations/panoptic_val.json", "rounds": 1,
           "filter": {"min_score": settings.min_score, "min_stability": settings.min_stability},
           "train": {"steps": settings.engine_steps, "batch_size": 8, "pseudo_ratio": 0.5}}
    (root / "engine.yaml").write_text("# segpipe demo's data-engine round: pseudo-label the pool, filter, retrain on "
                                      "train + kept, promote.\n" + yaml.safe_dump(job, sort_keys=False))
    spec = engine.load_job(str(root / "engine.yaml"))
    engine.check_job(spec)
    engine.run(spec, progress)
    before, after = engine.status(spec["out"])  # read back from the manifests, as `segpipe engine status` does
    summary.engine_pq_before, summary.engine_pq_after = before["heldout"]["pq"], after["heldout"]["pq"]
    summary.promoted = after["promoted"]
    return (f"held-out PQ {summary.engine_pq_before:.4f} -> {summary.engine_pq_after:.4f}, "
            f"{'promoted' if summary.promoted else 'not promoted'}; kept {after['filter']['kept']} of "
            f"{after['filter']['candidates']} pseudo-labels", "engine.yaml", "engine/round-1/manifest.json")


def _report(root: Path, settings: DemoSettings, summary: DemoSummary, progress: Progress):
    from pipeline.report import ReportConfig
    from pipeline.report import run as report

    done = report(ReportConfig(dataset=str(root / "annotations" / "panoptic_val.json"), out=str(root / "report"),
                               pred=str(root / "labels-val"), images=str(root / "val")), progress)
    summary.report = done.html
    return (f"health findings: {len(done.data['health']['findings'])}, label-error candidates: "
            f"{len(done.data['errors']['candidates'])}", "report/report.html", "report/report.json")


HEADER = ("step", "seconds", "result", "outputs (under OUT)")


def rows(summary: DemoSummary) -> list[tuple[str, str, str, str]]:
    """The closing table's rows: step, seconds, the key result, the outputs; then the total."""
    return [*((step.name, f"{step.seconds:.1f}", step.result, ", ".join(step.outputs)) for step in summary.steps),
            ("total", f"{summary.seconds:.1f}", f"OUT = {summary.out}", "demo.json")]
