"""The `segpipe` command: one thin command per verb; the work lives in the modules it calls."""

from __future__ import annotations

import functools
import json
import os
import re
import time
from typing import Annotated, Optional

import typer

from pipeline import synth as synth_stage
from pipeline import validate as validate_stage
from pipeline.cluster import RAY_LOGS, quiet_native_logs
from pipeline.errors import SegpipeError, WorkFailed
from pipeline.io.fs import write_json
from pipeline.models import MODELS
from pipeline.progress import show_table, shown

# The groups `segpipe --help` lists the verbs in (rich_help_panel of every command and sub-app).
DATA = "Data"
LABELING = "Labeling"
TRAINING = "Training and the engine"
EVALUATION = "Evaluation and reports"
JOBS = "Jobs"
BENCHMARKS = "Benchmarks"
EXIT_CODES = ("Exit codes: 0 done; 1 the work ran and found problems or failures (listed); "
              "2 bad usage or input (one line on stderr).")

app = typer.Typer(no_args_is_help=True, add_completion=False, pretty_exceptions_enable=False,
                  help="Label, convert and evaluate segmentation datasets at scale.", epilog=EXIT_CODES)
eval_app = typer.Typer(no_args_is_help=True, help="Evaluate predictions: panoptic quality (pq), COCO AP (ap), semantic mIoU (miou).")
app.add_typer(eval_app, name="eval", rich_help_panel=EVALUATION)
bench_app = typer.Typer(no_args_is_help=True, help="Benchmarks: JSON reports, medians of fresh-process runs.")
app.add_typer(bench_app, name="bench", rich_help_panel=BENCHMARKS)
engine_app = typer.Typer(no_args_is_help=True, help="The data engine: rounds of annotate, filter, retrain, evaluate, promote.")
app.add_typer(engine_app, name="engine", rich_help_panel=TRAINING)
review_app = typer.Typer(no_args_is_help=True, help="Human review: doubtful pseudo-labels out to CVAT or Label Studio, corrections back in.")
app.add_typer(review_app, name="review", rich_help_panel=LABELING)


@app.callback()
def _options(
    verbose: Annotated[bool, typer.Option("--verbose", help=f"Show Ray's own logs (start-up, workers, C++ notes); "
                                                            f"so does {RAY_LOGS}=1.")] = False,
) -> None:
    if verbose:
        os.environ[RAY_LOGS] = "1"  # read where Ray starts (pipeline.cluster), in this process and its children


Workers = Annotated[int, typer.Option(min=1, help="Local worker processes; 1 runs in this process. Output does not depend on it.")]
SAM = "SAM proposals (sam_vit_b/l/h only; SAM's defaults)"
Address = Annotated[Optional[str], typer.Option(help="Run the shards as Ray tasks on this cluster (auto, host:port, ray://...).")]
Threads = Annotated[Optional[int], typer.Option(min=0, help="With --workers 1: shards evaluated at once on threads of this process "
                                                        "(default 1; 0: every core it may use). Output does not depend on it. "
                                                        "Known issue: with tables, several threads can end the process in a C++ "
                                                        "abort at exit (about 1 run in 40), after the results are written.")]


def _user_errors(command):
    """Bad input ends in one line on stderr and exit code 2, never a traceback; work that failed where it ran, in
    one line and exit code 1."""
    @functools.wraps(command)
    def wrapper(*args, **kwargs):
        try:
            return command(*args, **kwargs)
        except WorkFailed as error:
            typer.echo(f"segpipe: error: {error}", err=True)
            raise typer.Exit(1) from None
        except SegpipeError as error:
            typer.echo(f"segpipe: error: {error}", err=True)
        except OSError as error:  # the filesystem refused (permissions, disk full, bad bucket)
            typer.echo(f"segpipe: error: {error.strerror or error}: {error.filename or ''}".rstrip(": "), err=True)
        raise typer.Exit(2)
    return wrapper


def _size(value: str) -> tuple[int, int]:
    match = re.fullmatch(r"(\d+)x(\d+)", value)
    if not match or int(match[1]) < 16 or int(match[2]) < 16:
        raise typer.BadParameter(f"{value!r}: expected HEIGHTxWIDTH, each at least 16, e.g. 256x256")
    return int(match[1]), int(match[2])


def _counts(value: str, option: str, least: int = 1) -> list[int]:
    try:
        counts = [int(v) for v in value.split(",")]
    except ValueError:
        raise SegpipeError(f"{option} {value!r}: expected numbers separated by commas") from None
    if min(counts) < least:
        raise SegpipeError(f"{option} {value!r}: each must be at least {least}")
    return counts


@app.command(rich_help_panel=DATA)
@_user_errors
def synth(
    out: Annotated[str, typer.Argument(help="Output root (any fsspec URI); gets <split>/ and annotations/.")],
    images: Annotated[int, typer.Option(min=1, help="Number of images.")],
    split: Annotated[str, typer.Option(help="Split name, e.g. train or val.")] = "train",
    seed: Annotated[int, typer.Option(help="Same seed, same bytes.")] = 0,
    size: Annotated[str, typer.Option(help="Image size HEIGHTxWIDTH.")] = "256x256",
    shard_size: Annotated[Optional[int], typer.Option(min=1, help="Also write tar shards of this many images.")] = None,
    workers: Annotated[int, typer.Option(min=1, help="Rendering processes (output does not depend on it).")] = os.cpu_count() or 1,
) -> None:
    """Write a synthetic COCO dataset: JPEGs, instances and panoptic JSON, panoptic PNGs.

    Example: segpipe synth demo-out --images 200 --split train --seed 0 --shard-size 50
    """
    height, width = _size(size)
    if not re.fullmatch(r"[A-Za-z0-9_.-]+", split):
        raise SegpipeError(f"split {split!r}: use letters, digits, '_', '-' and '.' only")
    start = time.perf_counter()
    config = synth_stage.SynthConfig(images=images, split=split, seed=seed, height=height, width=width,
                                     shard_size=shard_size, workers=workers)
    counts = synth_stage.write_dataset(out, config)
    seconds = time.perf_counter() - start
    typer.echo(f"wrote {counts['images']} images, {counts['segments']} panoptic segments, "
               f"{counts['instances']} instances" + (f", {counts['shards']} tar shards" if shard_size else "")
               + f" to {out} in {seconds:.1f} s ({counts['images'] / seconds:.0f} images/s)")


@app.command(rich_help_panel=DATA)
@_user_errors
def validate(
    file: Annotated[str, typer.Argument(help="COCO instances or panoptic JSON (any fsspec URI).")],
    png_dir: Annotated[Optional[str], typer.Option("--dir", help="Panoptic PNG folder (default: FILE without .json).")] = None,
    images: Annotated[Optional[str], typer.Option(help="Image folder: check image sizes against the JSON.")] = None,
) -> None:
    """Check a COCO file: one line per problem on stdout, exit 1 if there are any.

    Example: segpipe validate demo-out/annotations/panoptic_val.json --images demo-out/val
    """
    report = validate_stage.validate(file, folder=png_dir, images_folder=images)
    for problem in report.problems:
        typer.echo(str(problem))
    verdict = f"{len(report.problems)} problems" if report.problems else "valid"
    typer.echo(f"{file}: COCO {report.kind}, {report.images} images, {report.annotations} annotations "
               f"(files checked: {report.checked_files}): {verdict}", err=True)
    if report.problems:
        raise typer.Exit(1)


@app.command(rich_help_panel=DATA)
@_user_errors
def convert(
    src: Annotated[str, typer.Argument(help="COCO instances or panoptic JSON, a dataset table folder, a folder of SA-1B JSON files, or a predictions folder (`segpipe infer` layout) of class-agnostic proposals (any fsspec URI).")],
    out: Annotated[str, typer.Argument(help="Dataset table folder (from COCO), COCO JSON (from a table), predictions folder (from SA-1B), SA-1B folder (from predictions).")],
    png_dir: Annotated[Optional[str], typer.Option(help="Panoptic PNG folder of SRC, or of OUT from a table (default: the JSON path without .json).")] = None,
    images: Annotated[Optional[str], typer.Option(help="Image folder: the table records each image's URI in it; from SA-1B, where the images are (default: SRC, where SA-1B keeps them).")] = None,
    row_group_images: Annotated[int, typer.Option(min=1, help="Images per Parquet row group; evaluation reads a shard of 500 images, so 500 reads one row group a shard.")] = 500,
    gt: Annotated[Optional[str], typer.Option(help="SRC is a COCO results file on this ground truth: write OUT as a predictions table.")] = None,
) -> None:
    """Convert COCO files, dataset tables, results files and SA-1B files, exactly.

    A COCO file to a segpipe dataset table (Parquet) or back; a results file to a predictions table;
    SA-1B files to a predictions folder or back.

    Example: segpipe convert annotations/panoptic_val2017.json s3://bucket/val-table --images val2017

    Example: segpipe convert sa1b/sa_000000 proposals (then: segpipe convert proposals sa1b-again)
    """
    from pipeline import convert as convert_stage

    start = time.perf_counter()
    done = convert_stage.convert(src, out, png_dir=png_dir, images_dir=images, row_group_images=row_group_images, gt=gt)
    kind = {"predictions": "predictions table", "sa1b": "SA-1B files"}.get(done.kind, f"COCO {done.kind}")
    typer.echo(f"wrote {done.out}: {kind}, {done.images} images, {done.segments} segments "
               f"in {time.perf_counter() - start:.1f} s")


@app.command(rich_help_panel=LABELING)
@_user_errors
def infer(
    input: Annotated[str, typer.Option(help="Images: a folder, tar shards or Parquet files with image bytes (any fsspec URI or glob).")],
    model: Annotated[str, typer.Option(help=f"Model name: {', '.join(MODELS)}.")],
    out: Annotated[str, typer.Option(help="Output folder (any fsspec URI); a rerun into it resumes.")],
    weights: Annotated[Optional[str], typer.Option(help="Checkpoint (state dict) at a path or URI; never downloaded.")] = None,
    random_weights: Annotated[bool, typer.Option(help="Random initialisation instead of --weights (smoke runs, benchmarks).")] = False,
    seed: Annotated[int, typer.Option(help="Seed of --random-weights.")] = 0,
    categories: Annotated[Optional[str], typer.Option(help="COCO JSON whose categories the model predicts (segpipe_small without a checkpoint).")] = None,
    image_info: Annotated[Optional[str], typer.Option(help="COCO JSON giving each file's image id (default: the number in the name, else a hash).")] = None,
    name: Annotated[str, typer.Option(help="Exports are panoptic_NAME.json and instances_NAME_results.json.")] = "pred",
    batch_size: Annotated[int, typer.Option(min=1, help="Images per model call.")] = 4,
    actors: Annotated[int, typer.Option(min=1, help="Model actors (one per GPU when --gpus-per-actor is 1).")] = 1,
    gpus_per_actor: Annotated[float, typer.Option(min=0, help="GPUs each actor holds; 0 runs on CPU threads.")] = 0,
    cpus_per_actor: Annotated[Optional[float], typer.Option(min=0.25, help="CPUs each actor holds (default: all but 1 shared, at most 1 with GPUs).")] = None,
    files_per_shard: Annotated[int, typer.Option(min=1, help="Image-folder files per shard (the unit of commit and resume).")] = 64,
    score_threshold: Annotated[Optional[float], typer.Option(help="Detections (centres for segpipe_small) scoring below this are dropped. Default: --weights' validated setting, else 0.05.")] = None,
    stuff_area: Annotated[Optional[int], typer.Option(min=0, help="Stuff regions smaller than this many pixels become VOID. Default: --weights' validated setting, else 4096.")] = None,
    min_size: Annotated[Optional[int], typer.Option(min=16, help="Mask R-CNN: shorter side the images are resized to. Default: --weights' validated setting, else 800.")] = None,
    max_size: Annotated[Optional[int], typer.Option(min=16, help="Mask R-CNN: longest side at most. Default: --weights' validated setting, else 1333.")] = None,
    flip_check: Annotated[bool, typer.Option(help="Also label each image mirrored: every segment gets its flip agreement (flip_iou); twice the model time.")] = False,
    points_per_side: Annotated[int, typer.Option(min=1, help="A grid of N x N point prompts.", rich_help_panel=SAM)] = 32,
    points_per_batch: Annotated[int, typer.Option(min=1, help="Prompts decoded at once.", rich_help_panel=SAM)] = 64,
    pred_iou_thresh: Annotated[float, typer.Option(min=0, max=1, help="Drop masks whose predicted IoU is below this.", rich_help_panel=SAM)] = 0.88,
    stability_thresh: Annotated[float, typer.Option(min=0, max=1, help="Drop masks whose stability score is below this.", rich_help_panel=SAM)] = 0.95,
    stability_offset: Annotated[float, typer.Option(min=0, help="Stability compares the mask cut at logit -offset and +offset.", rich_help_panel=SAM)] = 1.0,
    box_nms_thresh: Annotated[float, typer.Option(min=0, max=1, help="Box IoU above which the lower-IoU mask is a duplicate.", rich_help_panel=SAM)] = 0.7,
    crop_layers: Annotated[int, typer.Option(min=0, help="Also run on 2^i x 2^i crops, i = 1 .. N (small objects).", rich_help_panel=SAM)] = 0,
    crop_nms_thresh: Annotated[float, typer.Option(min=0, max=1, help="Box NMS between crops.", rich_help_panel=SAM)] = 0.7,
    crop_overlap_ratio: Annotated[float, typer.Option(min=0, max=1, help="How much crops of the first layer overlap.", rich_help_panel=SAM)] = 512 / 1500,
    crop_points_downscale: Annotated[int, typer.Option(min=1, help="Layer i's grid has N / this^i points a side.", rich_help_panel=SAM)] = 1,
    min_region_area: Annotated[int, typer.Option(min=0, help="Remove holes and islands smaller than this from each mask (0: off).", rich_help_panel=SAM)] = 0,
    address: Address = None,
) -> None:
    """Label images with a model on Ray: Parquet predictions, COCO panoptic and results.

    With a SAM model (sam_vit_b/l/h, --weights: SAM's released checkpoint), class-agnostic proposals from its
    automatic mask generator: category 1 "object", score = predicted IoU, stability = SAM's stability score.
    Exit 1 when some images could not be used (listed in OUT/errors.parquet).

    Example: segpipe infer --input demo-out/val --model segpipe_small --weights demo-out/model/model.pt --out demo-out/labels-val
    """
    from pipeline import infer as infer_stage
    from pipeline.io.fs import read_json
    from pipeline.models import check_model_name
    from pipeline.models.base import ProposalSettings, with_checkpoint_settings

    dataset_categories = None
    if categories is not None:
        found = read_json(categories)
        dataset_categories = found.get("categories") if isinstance(found, dict) else None
        if not dataset_categories:
            raise SegpipeError(f"{categories}: no 'categories' list")
    check_model_name(model)
    given = {k: v for k, v in (("score_threshold", score_threshold), ("stuff_area", stuff_area),
                               ("min_size", min_size), ("max_size", max_size)) if v is not None}
    proposals = ProposalSettings(
        points_per_side=points_per_side, points_per_batch=points_per_batch, pred_iou_thresh=pred_iou_thresh,
        stability_score_thresh=stability_thresh, stability_score_offset=stability_offset,
        box_nms_thresh=box_nms_thresh, crop_n_layers=crop_layers, crop_nms_thresh=crop_nms_thresh,
        crop_overlap_ratio=crop_overlap_ratio, crop_n_points_downscale_factor=crop_points_downscale,
        min_mask_region_area=min_region_area)
    settings = with_checkpoint_settings(infer_stage.ModelSettings(
        weights=weights, random_weights=random_weights, seed=seed, proposals=proposals,
        categories=tuple(dataset_categories) if dataset_categories else None), model, given)
    config = infer_stage.InferConfig(
        input=input, out=out, model=model, settings=settings, name=name, batch_size=batch_size, actors=actors,
        gpus_per_actor=gpus_per_actor, cpus_per_actor=cpus_per_actor, files_per_shard=files_per_shard,
        image_info=image_info, flip_check=flip_check, address=address)
    with shown() as progress:
        summary = infer_stage.run(config, progress=progress)
    stages = ", ".join(f"{stage} {seconds:.1f}" for stage, seconds in summary.stage_s.items())
    show_table([("images", summary.images), ("segments", summary.segments), ("failed", summary.failed),
                ("images/s", f"{summary.images_per_s:.1f} ({summary.wall_s:.1f} s wall; busy s: {stages})"),
                *summary.outputs.items()])
    if summary.failed:
        typer.echo(f"segpipe: {summary.failed} images failed; see {summary.outputs['errors']}", err=True)
        raise typer.Exit(1)


@app.command("filter", rich_help_panel=LABELING)
@_user_errors
def filter_command(
    pred: Annotated[str, typer.Option(help="A `segpipe infer` output folder (any fsspec URI).")],
    out: Annotated[str, typer.Option(help="Output folder: decisions/, predictions/ (the kept segments), filter.json; `segpipe train --train OUT` reads it.")],
    min_score: Annotated[Optional[float], typer.Option(help="Keep segments whose class confidence is at least this.")] = None,
    min_stability: Annotated[Optional[float], typer.Option(help="... whose stability score is at least this (SAM: 0.95).")] = None,
    min_flip_iou: Annotated[Optional[float], typer.Option(help="... whose flip agreement is at least this (needs infer --flip-check).")] = None,
    min_class_agreement: Annotated[Optional[float], typer.Option(help="... whose class agreement is at least this: the share of a proposal's pixels the panoptic model gives its class (needs segpipe classify).")] = None,
    min_area: Annotated[Optional[int], typer.Option(min=0, help="... of at least this many pixels.")] = None,
    max_area: Annotated[Optional[int], typer.Option(min=0, help="... of at most this many pixels.")] = None,
    class_rules: Annotated[Optional[str], typer.Option(help='Per-class overrides, JSON: {"CATEGORY_ID": {"min_score": 0.5, ...}}; a class takes these instead of the options above.')] = None,
    duplicate_iou: Annotated[float, typer.Option(min=0, help="Reject a segment whose mask overlaps a higher-scoring kept one by more than this IoU; 1 switches it off.")] = 0.7,
    audit: Annotated[Optional[str], typer.Option(help="COCO panoptic or instances labels of a sample of the images: precision, recall (and PQ) of each rule and of the kept set there.")] = None,
    target_precision: Annotated[Optional[float], typer.Option(min=0, max=1, help="With --audit: choose the --tune rule's threshold per class, the loosest whose audit precision reaches this.")] = None,
    tune: Annotated[str, typer.Option(help="The rule --target-precision chooses per class: min_score, min_stability, min_flip_iou or min_class_agreement.")] = "min_score",
) -> None:
    """Choose pseudo-labels by rules on their quality signals, audited on a labelled sample.

    Every candidate segment is kept or rejected (with the first rule that rejected it).

    Example: segpipe filter --pred demo-out/engine/round-1/infer --out kept --min-score 0.3 --min-stability 0.9
    """
    from pipeline.filtering import TUNABLE, FilterRules, Thresholds, run

    if tune not in TUNABLE:
        raise SegpipeError(f"--tune {tune!r}: one of {', '.join(TUNABLE)}")

    thresholds = Thresholds(min_score=min_score, min_stability=min_stability, min_flip_iou=min_flip_iou,
                            min_class_agreement=min_class_agreement, min_area=min_area, max_area=max_area)
    per_class = FilterRules.parse_per_class(class_rules, thresholds) if class_rules else {}
    summary = run(pred, out, FilterRules(thresholds, per_class, duplicate_iou if duplicate_iou < 1 else None), audit,
                  (tune, target_precision) if target_precision is not None else None)
    for category, chosen in (summary.get("tuned") or {}).get("per_class", {}).items():
        typer.echo(f"class {category}: {tune} {chosen['threshold']:.4g} (audit precision "
                   f"{_figure(chosen['precision'])} on {chosen['candidates']} of {chosen['audited']} candidates)")
    rejected = ", ".join(f"{rule} {n}" for rule, n in summary["rejected"].items() if n) or "none"
    typer.echo(f"{summary['kept']} of {summary['candidates']} segments kept; rejected by {rejected}")
    if audit:
        report = summary["audit"]
        typer.echo(f"audit: kept precision {_figure(report['kept']['precision'])}, recall "
                   f"{_figure(report['kept']['recall'])}, PQ {_figure(report['kept']['pq'])} on {report['images']} images")
        for rule, figures in report["per_rule"].items():
            typer.echo(f"  {rule:14} alone keeps {figures['candidates']:6}: precision {_figure(figures['precision'])}, "
                       f"recall {_figure(figures['recall'])}")
    typer.echo(f"  decisions  {out.rstrip('/')}/decisions\n  labels     {out.rstrip('/')} (segpipe train --train)")


@app.command(rich_help_panel=LABELING)
@_user_errors
def classify(
    proposals: Annotated[str, typer.Option(help="Class-agnostic proposals: a `segpipe infer` output folder of a proposals model (SAM) or `segpipe convert` of SA-1B files.")],
    panoptic: Annotated[str, typer.Option(help="A panoptic model's `segpipe infer` output folder on the same images (paired by file name).")],
    out: Annotated[str, typer.Option(help="Output folder: predictions/ (the classified proposals, largest first), categories.json, classify.json, run.json.")],
) -> None:
    """Give class-agnostic proposals (SAM's) the classes of a panoptic model's prediction.

    Each proposal gets the category covering most of its pixels, with that share as class_agreement.

    Example: segpipe classify --proposals sam-out --panoptic panoptic-out --out classified
    """
    from pipeline.proposals import run

    summary = run(proposals, panoptic, out)
    counts = summary["counts"]
    typer.echo(f"{counts['classified']} of {counts['proposals']} proposals classified on {counts['images']} images; "
               f"{counts['unclassified']} without a labelled pixel left out (classify.json)"
               + (f"; {counts['images_without_panoptic']} images without panoptic rows" if counts['images_without_panoptic'] else ""))
    typer.echo(f"  labels     {out.rstrip('/')} (segpipe filter --pred, segpipe train --train)")


@engine_app.command("run")
@_user_errors
def engine_run(
    job: Annotated[str, typer.Argument(help="The job spec (YAML, schemas/engine-job.json; see jobs/engine.yaml).")],
) -> None:
    """Run a data-engine job's rounds, resuming what its out folder holds.

    Example: segpipe engine run jobs/engine.yaml
    """
    from pipeline import engine

    spec = engine.load_job(job)
    engine.check_job(spec)
    with shown() as progress:
        manifests = engine.run(spec, progress=progress)
    typer.echo(engine.table(manifests))
    if not manifests[-1].get("waiting"):
        typer.echo(f"model: {manifests[-1]['current']}")


@engine_app.command("review")
@_user_errors
def engine_review(
    out: Annotated[str, typer.Argument(help="A data-engine job's out folder.")],
    round: Annotated[int, typer.Argument(min=1, help="The round whose review export people corrected.")],
    corrected: Annotated[str, typer.Argument(help="Their corrections: CVAT's COCO 1.0 export, or Label Studio's JSON export.")],
) -> None:
    """Import people's corrections of a round's review export into the engine.

    They are human labels for that round's retrain (if it has not started) and every later round's; the accepted /
    changed / deleted / added counts go into the round's manifest.

    Example: segpipe engine review engine-out 1 annotations/instances_default.json
    """
    from pipeline import engine

    summary = engine.import_review(out, round, corrected)
    typer.echo(f"round {round}: {summary['accepted']} accepted, {summary['changed']} changed, {summary['deleted']} "
               f"deleted, {summary['added']} added; labels in {out.rstrip('/')}/round-{round}/reviewed")


@engine_app.command("status")
@_user_errors
def engine_status(
    out: Annotated[str, typer.Argument(help="A data-engine job's out folder.")],
) -> None:
    """The rounds so far: candidates, kept, audit precision, held-out PQ, promoted.

    Example: segpipe engine status demo-out/engine
    """
    from pipeline import engine

    typer.echo(engine.table(engine.status(out)))


@review_app.command("export")
@_user_errors
def review_export(
    filtered: Annotated[str, typer.Option("--filtered", help="A `segpipe filter` output folder (any fsspec URI).")],
    out: Annotated[str, typer.Option(help="Output folder: images/, images.txt, cvat/, label-studio/, review-export.json.")],
    images: Annotated[int, typer.Option(min=1, help="Images to export, the most doubtful first (most borderline candidates).")] = 50,
    margin: Annotated[float, typer.Option(min=0, help="Borderline: rejected by the score, stability or flip rule, at most this far below the threshold.")] = 0.1,
    prefill: Annotated[bool, typer.Option(help="Also export the kept segments of those images, for people to correct.")] = True,
    format: Annotated[Optional[list[str]], typer.Option("--format", help="cvat and/or label-studio (repeat; default both).")] = None,
    image: Annotated[Optional[list[str]], typer.Option("--image", help="Export this image (file name or id) instead of choosing by doubt (repeat).")] = None,
    image_url: Annotated[str, typer.Option(help="Label Studio: data.image is this prefix + the file name.")] = "/data/local-files/?d=",
) -> None:
    """Write the most doubtful candidates for people to correct in CVAT or Label Studio.

    CVAT gets a COCO 1.0 file, Label Studio tasks with brush pre-annotations.

    Example: segpipe review export --filtered round-1/filter --out review-1 --images 100
    """
    from pipeline.review import FORMATS, ExportConfig, export

    manifest = export(ExportConfig(filtered=filtered, out=out, images=images, margin=margin, prefill=prefill,
                                   formats=tuple(format or FORMATS), only=tuple(image or ()), image_url=image_url))
    masks = manifest["masks"]
    typer.echo(f"exported {len(manifest['images'])} images: {masks['borderline']} borderline and {masks['kept']} kept "
               f"masks ({masks['empty_left_out']} empty masks left out)")
    typer.echo(f"  images     {out.rstrip('/')}/images (names in images.txt)")
    for kind, files in (("cvat", "cvat/instances.json, labels in cvat/labels.json"),
                        ("label-studio", "label-studio/tasks.json, config in label-studio/config.xml")):
        if kind in manifest["formats"]:
            typer.echo(f"  {kind:10} {out.rstrip('/')}/{files}")


@review_app.command("import")
@_user_errors
def review_import(
    export_dir: Annotated[str, typer.Option("--export", help="The `segpipe review export` folder the file was made from.")],
    corrected: Annotated[str, typer.Option(help="The reviewed file: CVAT's COCO 1.0 export (instances JSON) or Label Studio's JSON export.")],
    out: Annotated[str, typer.Option(help="Labels folder (segpipe train --train OUT) and review.json.")],
) -> None:
    """Read people's corrections back as labels: masks accepted, changed, deleted, added.

    Example: segpipe review import --export review-1 --corrected instances_default.json --out labels-1
    """
    from pipeline.review import import_review

    summary = import_review(export_dir, corrected, out)
    ratios = summary["ratios"]
    typer.echo(f"{summary['images']} images reviewed: of {summary['exported_masks']} exported masks "
               f"{summary['accepted']} accepted ({_figure(ratios['accepted'])}), {summary['changed']} changed "
               f"({_figure(ratios['changed'])}), {summary['deleted']} deleted ({_figure(ratios['deleted'])}); "
               f"{summary['added']} added")
    typer.echo(f"  labels     {out.rstrip('/')} (segpipe train --train)")


def _figure(value: float | None) -> str:
    return "-" if value is None else f"{value:.2f}"


@app.command(rich_help_panel=TRAINING)
@_user_errors
def train(
    train: Annotated[list[str], typer.Option(help="Human training labels: COCO panoptic or instances JSON, or a folder of the predictions-table layout (`segpipe review import`, `segpipe infer`); repeat for more sources, one stream.")],
    val: Annotated[str, typer.Option(help="Validation labels, in the same forms; PQ and AP are measured on them.")],
    model: Annotated[str, typer.Option(help=f"Model name: {', '.join(MODELS)} (from a seeded random start, or from --init; a family segpipe cannot train says so).")],
    out: Annotated[str, typer.Option(help="Output folder (any fsspec URI): checkpoints/, model.pt, metrics.json, train.json.")],
    init: Annotated[Optional[str], typer.Option(help="Start from this checkpoint (path or URI); default: random initialisation.")] = None,
    train_images: Annotated[Optional[str], typer.Option(help="Images of the first --train (default: COCO layout, ROOT/SPLIT beside ROOT/annotations/; a folder's run.json input).")] = None,
    val_images: Annotated[Optional[str], typer.Option(help="Images of --val (default as for --train-images).")] = None,
    pseudo: Annotated[Optional[list[str]], typer.Option(help="Pseudo-labels to train on beside --train: a `segpipe filter` or `segpipe infer` output folder (repeat for more).")] = None,
    pseudo_ratio: Annotated[Optional[float], typer.Option(min=0, max=1, help="The share of every batch drawn from --pseudo (default: all examples alike).")] = None,
    steps: Annotated[Optional[int], typer.Option(min=1, help="Optimiser steps (or give --epochs).")] = None,
    epochs: Annotated[Optional[float], typer.Option(min=0, help="Passes over the training images (or give --steps).")] = None,
    batch_size: Annotated[int, typer.Option(min=1, help="Images per step, over all workers.")] = 8,
    learning_rate: Annotated[Optional[float], typer.Option(min=0, help="Peak learning rate (default: the model's: 2e-3 AdamW for segpipe_small, 5e-3 SGD for Mask R-CNN).")] = None,
    workers: Annotated[int, typer.Option(min=1, help="Ray Train workers (DDP: gloo on CPU, nccl on GPU).")] = 1,
    gpus_per_worker: Annotated[float, typer.Option(min=0, help="GPUs each worker holds; 0 trains on CPU.")] = 0,
    checkpoint_every: Annotated[Optional[int], typer.Option(min=1, help="Validate and checkpoint every this many steps (default: 5 times a run).")] = None,
    seed: Annotated[int, typer.Option(help="Seed of the initialisation, data order and flips.")] = 0,
    min_size: Annotated[int, typer.Option(min=16, help="Mask R-CNN: shorter side the images are resized to.")] = 800,
    max_size: Annotated[int, typer.Option(min=16, help="Mask R-CNN: longest side at most.")] = 1333,
    resume: Annotated[bool, typer.Option(help="Continue the run OUT holds from its last checkpoint.")] = False,
    address: Address = None,
) -> None:
    """Train a model on Ray Train (data-parallel), validated by PQ and AP; resumable.

    Example: segpipe train --train demo-out/annotations/panoptic_train.json \\
    --val demo-out/annotations/panoptic_val.json --model segpipe_small --steps 200 --out demo-out/model
    """
    from dataclasses import replace

    from pipeline import train as train_stage

    config = train_stage.TrainConfig(
        train=train[0], more_train=tuple(train[1:]), val=val, model=model, out=out, init=init, train_images=train_images, val_images=val_images,
        pseudo=tuple(pseudo or ()), pseudo_ratio=pseudo_ratio, workers=workers, gpus_per_worker=gpus_per_worker, steps=steps, epochs=epochs, batch_size=batch_size,
        learning_rate=learning_rate, seed=seed, checkpoint_every=checkpoint_every, resume=resume, address=address,
        settings=replace(train_stage.TrainConfig.settings, min_size=min_size, max_size=max_size))
    start = time.perf_counter()
    with shown() as progress:
        result = train_stage.run(config, progress=progress)
    show_table([(point["step"], *(f"{point[key]:.4f}" if key in point else "-"
                                  for key in ("pq", "pq_things", "pq_stuff", "ap"))) for point in result.history],
               header=("step", "PQ", "PQ_th", "PQ_st", "AP"))
    show_table([("steps", f"{result.steps} in {time.perf_counter() - start:.1f} s"), ("model", result.model)])


def _report(result: dict, table: str, out: str | None, start: float) -> None:
    if out:
        write_json(out, result)
    typer.echo(table)
    typer.echo(f"evaluated in {time.perf_counter() - start:.1f} s" + (f"; results in {out}" if out else ""))


@eval_app.command("pq")
@_user_errors
def eval_pq(
    gt: Annotated[str, typer.Option(help="Ground truth: COCO panoptic JSON, or a panoptic dataset table (segpipe convert).")],
    pred: Annotated[str, typer.Option(help="Predictions: COCO panoptic JSON, the predictions Parquet (file or folder) or a dataset table.")],
    gt_dir: Annotated[Optional[str], typer.Option(help="Ground-truth PNG folder (default: GT without .json).")] = None,
    pred_dir: Annotated[Optional[str], typer.Option(help="Prediction PNG folder (default: PRED without .json).")] = None,
    out: Annotated[Optional[str], typer.Option(help="Write the results JSON here.")] = None,
    drop_unknown_categories: Annotated[bool, typer.Option(
        help="Make predicted segments of categories the ground truth lacks VOID instead of refusing them.")] = False,
    workers: Workers = 1,
    address: Address = None,
    threads: Threads = None,
) -> None:
    """Panoptic quality (PQ, SQ, RQ) as panopticapi's pq_compute, and the semantic view's mIoU.

    Example: segpipe eval pq --gt annotations/panoptic_val2017.json --pred labels/predictions --out pq.json
    """
    from pipeline.evaluate.pq import evaluate_pq, format_table

    start = time.perf_counter()
    with shown() as progress:
        result = evaluate_pq(gt, pred, gt_dir=gt_dir, pred_dir=pred_dir, workers=workers, address=address,
                             drop_unknown_categories=drop_unknown_categories, threads=threads, progress=progress)
    if result["dropped_segments"]:
        typer.echo(f"segpipe: made {result['dropped_segments']} segments of categories the ground truth lacks VOID",
                   err=True)
    _report(result, format_table(result), out, start)


@eval_app.command("ap")
@_user_errors
def eval_ap(
    gt: Annotated[str, typer.Option(help="Ground truth: COCO instances JSON, or an instances dataset table (segpipe convert).")],
    pred: Annotated[str, typer.Option(help="Detections: COCO results JSON, or the predictions Parquet (file or folder).")],
    iou_type: Annotated[str, typer.Option(help="segm (masks) or bbox (boxes).")] = "segm",
    out: Annotated[Optional[str], typer.Option(help="Write the results JSON here.")] = None,
    drop_unknown_categories: Annotated[bool, typer.Option(
        help="Leave out detections of categories the ground truth lacks (as pycocotools does) instead of refusing.")] = False,
    workers: Workers = 1,
    address: Address = None,
    threads: Threads = None,
) -> None:
    """COCO AP and AR (the 12 COCOeval numbers, and per class) as pycocotools computes them.

    Example: segpipe eval ap --gt annotations/instances_val2017.json --pred detections.json --iou-type segm
    """
    from pipeline.evaluate.ap import evaluate_ap, format_table

    start = time.perf_counter()
    with shown() as progress:
        result = evaluate_ap(gt, pred, iou_type=iou_type, workers=workers, address=address,
                             drop_unknown_categories=drop_unknown_categories, threads=threads, progress=progress)
    if result["dropped_detections"]:
        typer.echo(f"segpipe: dropped {result['dropped_detections']} detections of categories the ground truth lacks",
                   err=True)
    _report(result, format_table(result), out, start)


@eval_app.command("miou")
@_user_errors
def eval_miou(
    gt: Annotated[str, typer.Option(help="Ground truth: a folder of label PNGs (class index per pixel), or a COCO panoptic JSON.")],
    pred: Annotated[str, typer.Option(help="Predictions: label PNGs named as the ground truth's, or a COCO panoptic JSON.")],
    classes: Annotated[Optional[str], typer.Option(help="Label PNGs: the class list (JSON: names, or COCO categories) or the number of classes.")] = None,
    ignore_index: Annotated[int, typer.Option(help="Label PNGs: the unlabelled value (ignored in GT, VOID in predictions).")] = 255,
    gt_dir: Annotated[Optional[str], typer.Option(help="Panoptic: ground-truth PNG folder (default: GT without .json).")] = None,
    pred_dir: Annotated[Optional[str], typer.Option(help="Panoptic: prediction PNG folder (default: PRED without .json).")] = None,
    out: Annotated[Optional[str], typer.Option(help="Write the results JSON here.")] = None,
    workers: Workers = 1,
    address: Address = None,
    threads: Threads = None,
) -> None:
    """Semantic segmentation: mIoU, fwIoU, aAcc, mAcc and per-class IoU.

    The definitions are mmsegmentation's and detectron2's.

    Example: segpipe eval miou --gt ade/annotations/validation --pred out/sem --classes ade20k_classes.json
    """
    from pipeline.evaluate.miou import evaluate_miou, format_table

    start = time.perf_counter()
    with shown() as progress:
        result = evaluate_miou(gt, pred, classes=classes, ignore_index=ignore_index, gt_dir=gt_dir, pred_dir=pred_dir,
                               workers=workers, address=address, threads=threads, progress=progress)
    _report(result, format_table(result), out, start)


@app.command(rich_help_panel=EVALUATION)
@_user_errors
def report(
    dataset: Annotated[str, typer.Option(help="Ground truth: COCO instances or panoptic JSON (+ PNG folder), or a dataset table (segpipe convert).")],
    out: Annotated[str, typer.Option(help="Folder for report.html and report.json (any fsspec URI).")],
    pred: Annotated[Optional[str], typer.Option(help="Predictions: COCO panoptic JSON, COCO results JSON, a predictions table or a segpipe infer output folder.")] = None,
    compare: Annotated[Optional[str], typer.Option(help="A second prediction set of the same images, compared with --pred.")] = None,
    images: Annotated[Optional[str], typer.Option(help="Image folder for the thumbnails (default: COCO's layout, ROOT/SPLIT).")] = None,
    thumbnails: Annotated[int, typer.Option(min=0, help="Images shown with ground truth and predictions overlaid.")] = 8,
    resamples: Annotated[int, typer.Option(min=1, help="Bootstrap resamples of the images (the comparison's intervals).")] = 1000,
    seed: Annotated[int, typer.Option(help="Bootstrap seed: the same seed, the same intervals.")] = 0,
    shard_size: Annotated[int, typer.Option(min=1, help="Images per shard: what one worker holds at once.")] = 500,
    leakage_with: Annotated[Optional[list[str]], typer.Option(help="Another split (COCO JSON in COCO's layout) whose images are checked for exact and near duplicates of the dataset's (repeat).")] = None,
    workers: Workers = 1,
    address: Address = None,
) -> None:
    """A dataset's report (HTML, JSON): health, contents, with --pred the model's errors.

    Health: labels, masks, image files, duplicates, leakage. With --pred the model's errors: per-class PQ / AP,
    confusion, calibration, TIDE, panoptic error split, label-error candidates; with --compare both prediction
    sets with bootstrap intervals.

    Writes OUT/report.html (self-contained: opens from disk, no network), OUT/report.json (every number on the
    page) and with --pred OUT/label-errors.json (the candidates as a COCO file for review). Progress goes to stderr.

    Example: segpipe report --dataset annotations/panoptic_val.json --pred labels-val --out report
    """
    from pipeline.report import ReportConfig, run

    start = time.perf_counter()
    with shown() as progress:
        result = run(ReportConfig(dataset=dataset, out=out, pred=pred, compare=compare, images=images, workers=workers,
                                  address=address, shard_size=shard_size, resamples=resamples, seed=seed,
                                  thumbnails=thumbnails, leakage_with=tuple(leakage_with or ())), progress=progress)
    show_table([("report", result.html), ("numbers", result.json),
                *([("label errors", f"{out.rstrip('/')}/label-errors.json")] if pred else []),
                ("seconds", f"{time.perf_counter() - start:.1f}")])


@app.command("run", rich_help_panel=JOBS)
@_user_errors
def run_job(
    job: Annotated[str, typer.Argument(help="The job spec (YAML; kind: label, eval, engine or report; see jobs/).")],
    address: Address = None,
) -> None:
    """Run a job spec here (label, eval, engine or report), checked against its schema first.

    The schema is schemas/KIND-job.json. A label job labels the input's shards that no earlier run committed (run it again: it does only what is new).

    Example: segpipe run jobs/label.yaml
    """
    from pipeline import jobs

    spec = jobs.load(job)
    with shown() as progress:
        code = jobs.run(spec, address=address, progress=progress)
    raise typer.Exit(code)


@bench_app.command("eval")
@_user_errors
def bench_eval(
    data: Annotated[str, typer.Option(help="Folder for the benchmark data (made once, then reused).")] = "bench-data",
    images: Annotated[int, typer.Option(min=1, help="Images per data set (COCO val has 5,000).")] = 1000,
    size: Annotated[str, typer.Option(help="Image size HEIGHTxWIDTH.")] = "480x640",
    tasks: Annotated[str, typer.Option(help="Comma-separated: ap (every shape), ap-few, ap-many, pq (synth and every shape), pq-few, pq-many, miou.")] = "ap,pq,miou",
    shapes: Annotated[str, typer.Option(help="AP and PQ data shapes: few (~4 GT, ~6 detections an image), many (up to 80, tied scores).")] = "few,many",
    repeat: Annotated[int, typer.Option(min=1, help="Runs per measurement; the median is reported.")] = 3,
    workers: Annotated[str, typer.Option(help="segpipe worker counts, comma-separated (the other tools run once, on 1).")] = "1",
    threads: Annotated[str, typer.Option(help="segpipe thread counts with one worker, comma-separated; 0: every core.")] = "1",
    out: Annotated[str, typer.Option(help="Report JSON.")] = "bench-eval.json",
) -> None:
    """AP, PQ and mIoU: segpipe against pycocotools, faster-coco-eval, hotcoco, torchmetrics.

    Each measurement runs in a fresh process, on the same cores. Exit 1 when one failed or its numbers
    differ from the reference tool's by more than 1e-9 (FAILED or MISMATCH in the table).

    Example: segpipe bench eval --images 1000 --repeat 3 --threads 0,1
    """
    from pathlib import Path

    from pipeline.bench import run

    height, width = _size(size)
    try:
        report = run(Path(data), images, height, width, repeat, _counts(workers, "--workers"), Path(out),
                     tasks=tasks.split(","), shapes=shapes.split(","), echo=typer.echo,
                     threads=_counts(threads, "--threads", 0))
    except ValueError as error:
        raise SegpipeError(str(error)) from None
    typer.echo(f"report: {out}")
    bad = [row for row in report["rows"] if "error" in row or row.get("mismatch")]
    if bad:  # the table above marks them FAILED or MISMATCH
        typer.echo(f"segpipe: {len(bad)} measurements failed or disagree with the reference", err=True)
        raise typer.Exit(1)


@bench_app.command("infer")
@_user_errors
def bench_infer(
    data: Annotated[str, typer.Option(help="Folder for the synthetic shards (made once, then reused).")] = "bench-infer-data",
    images: Annotated[int, typer.Option(min=1, help="Images.")] = 1024,
    size: Annotated[str, typer.Option(help="Image size HEIGHTxWIDTH.")] = "256x256",
    model: Annotated[str, typer.Option(help=f"Model name: {', '.join(MODELS)}.")] = "segpipe_small",
    weights: Annotated[Optional[str], typer.Option(help="Checkpoint to measure with (default: random weights, seed 0).")] = None,
    batch_size: Annotated[int, typer.Option(min=1, help="Images per model call.")] = 8,
    threads: Annotated[int, typer.Option(min=1, help="torch threads of the raw model (the pipeline's actor gets as many CPUs).")] = 1,
    repeat: Annotated[int, typer.Option(min=1, help="Runs per measurement; the median is reported.")] = 3,
    actors: Annotated[str, typer.Option(help="Actor counts to measure, comma-separated.")] = "1,2",
    out: Annotated[str, typer.Option(help="Report JSON.")] = "bench-infer.json",
) -> None:
    """Inference: `segpipe infer` end to end against the raw model (efficiency, scaling).

    Both run on the same decoded batches with the same threads.

    Example: segpipe bench infer --images 1024 --size 256x256 --actors 1,2
    """
    from pathlib import Path

    from pipeline.bench_infer import run
    from pipeline.models import check_model_name

    check_model_name(model)
    height, width = _size(size)
    run(Path(data), images, height, width, model, weights, batch_size, threads, repeat, _counts(actors, "--actors"),
        Path(out), echo=typer.echo)
    typer.echo(f"report: {out}")


@bench_app.command("report")
@_user_errors
def bench_report(
    data: Annotated[str, typer.Option(help="Folder for the synthetic datasets and predictions (made once, then reused).")] = "bench-report-data",
    images: Annotated[str, typer.Option(help="Dataset sizes to measure, comma-separated.")] = "2500,10000",
    size: Annotated[str, typer.Option(help="Image size HEIGHTxWIDTH.")] = "128x128",
    workers: Workers = 1,
    shard_size: Annotated[int, typer.Option(min=1, help="Images per shard.")] = 500,
    inputs: Annotated[str, typer.Option(help="Input forms, comma-separated: json (COCO files), tables (segpipe convert).")] = "json,tables",
    out: Annotated[str, typer.Option(help="Report JSON.")] = "bench-report.json",
) -> None:
    """segpipe report on synthetic data of several sizes: wall time and peak memory.

    Each size has two prediction sets compared.

    Example: segpipe bench report --images 2500,10000 --size 128x128 --inputs json,tables
    """
    from pathlib import Path

    from pipeline.bench_report import run

    height, width = _size(size)
    forms = tuple(inputs.split(","))
    if not set(forms) <= {"json", "tables"}:
        raise SegpipeError(f"--inputs {inputs!r}: use json, tables or both")
    run(Path(data), _counts(images, "--images"), height, width, workers, shard_size, Path(out), inputs=forms,
        echo=typer.echo)
    typer.echo(f"report: {out}")


@app.command(rich_help_panel=JOBS)
@_user_errors
def schedule(
    job: Annotated[str, typer.Argument(help="A label job spec (YAML); its schedule section gives the cron expression.")],
    once: Annotated[bool, typer.Option(help="Run one tick and exit (for cron, a systemd timer or an orchestrator).")] = False,
    address: Address = None,
) -> None:
    """Label what is new in a label job's input, on its cron schedule (ticks).

    Each tick labels the shards no earlier tick committed, exactly once, under leases that let ticks overlap and a
    dead tick's work be taken over; --once runs one tick (for cron, a systemd timer or a Kubernetes CronJob).

    Example: segpipe schedule jobs/label.yaml --once
    """
    from pipeline import jobs
    from pipeline.jobs import schedule as scheduled

    loaded = jobs.load(job)
    with shown() as progress:
        if once:
            summary = scheduled.tick(loaded, address, progress=progress)
            code = summary.exit_code
            typer.echo(scheduled.describe(summary))
        else:
            code = scheduled.serve(loaded, address, progress, report=lambda summary: typer.echo(scheduled.describe(summary)))
    raise typer.Exit(code)


# --- submission to a Ray cluster: segpipe submit, segpipe jobs list | status | logs | stop -------------------

jobs_app = typer.Typer(no_args_is_help=True, help="Jobs submitted to a Ray cluster: list, status, logs, stop.")
app.add_typer(jobs_app, name="jobs", rich_help_panel=JOBS)
JobServer = Annotated[Optional[str], typer.Option("--address", help="Ray's job server (the dashboard), e.g. http://HEAD:8265. Default: RAY_ADDRESS, else http://127.0.0.1:8265.")]
JobId = Annotated[str, typer.Argument(help="The submission id (segpipe submit prints it; segpipe jobs list lists them).")]


def _ended(status: str) -> None:
    """Exit 1 for a job that failed or was stopped."""
    if status in ("FAILED", "STOPPED"):
        raise typer.Exit(1)


@app.command(rich_help_panel=JOBS)
@_user_errors
def submit(
    job: Annotated[str, typer.Argument(help="The job spec (YAML); checked here, before the cluster is contacted.")],
    address: JobServer = None,
    window: Annotated[Optional[str], typer.Option(help="A time window (e.g. a schedule tick's, 20261127T1415): one submission per spec and window.")] = None,
    follow: Annotated[bool, typer.Option(help="Stream the job's logs until it ends; exit 1 if it failed or was stopped.")] = False,
) -> None:
    """Run a job spec on a Ray cluster through Ray's Job Submission API.

    The spec and segpipe's code are shipped; the cluster needs segpipe's dependencies. The same spec (and --window) submitted again attaches to the first submission,
    unless that one failed or was stopped: then it is resubmitted as ID-retryN, and resumes.

    Example: segpipe submit jobs/label.yaml --address http://head:8265 --follow
    """
    from pipeline import jobs
    from pipeline.jobs import submit as submission

    done = submission.submit(jobs.load(job), address, window)
    verb = "attached to" if done.attached else "submitted"
    typer.echo(f"{verb} {done.submission_id} ({done.status}) at {done.address}")
    if follow:
        status = submission.follow(submission.connect(address), done.submission_id, lambda text: typer.echo(text, nl=False))
        typer.echo(f"{done.submission_id}: {status}")
        _ended(status)


@jobs_app.command("list")
@_user_errors
def jobs_list(
    json_: Annotated[bool, typer.Option("--json", help="Print JSON: one object per job.")] = False,
    all_: Annotated[bool, typer.Option("--all", help="Also jobs submitted by other tools than segpipe.")] = False,
    address: JobServer = None,
) -> None:
    """The submitted segpipe jobs, oldest first.

    Their id, kind, status, start and end (UTC), and Ray's message.

    Example: segpipe jobs list --address http://head:8265 --json
    """
    from pipeline.jobs.submit import list_jobs

    found = list_jobs(address, everything=all_)
    if json_:
        typer.echo(json.dumps(found, indent=1))
        return
    from rich.console import Console
    from rich.table import Column, Table

    def when(iso: str | None) -> str:
        return iso.replace("T", " ").removesuffix("+00:00") if iso else ""

    table = Table(Column("submission id", no_wrap=True), "kind", Column("status", no_wrap=True), Column("start (UTC)", overflow="fold"),
                  Column("end (UTC)", overflow="fold"), Column("message", overflow="fold"))
    for job in found:
        table.add_row(job["submission_id"], job["kind"] or "", job["status"], when(job["start_time"]),
                      when(job["end_time"]), job["message"] or "")
    Console().print(table)


@jobs_app.command("status")
@_user_errors
def jobs_status(
    job: JobId,
    json_: Annotated[bool, typer.Option("--json", help="Print JSON.")] = False,
    address: JobServer = None,
) -> None:
    """A submitted job's status; exit 1 if it failed or was stopped.

    Example: segpipe jobs status segpipe-label-84c23cb89526fe1e --json
    """
    from pipeline.jobs.submit import status

    found = status(job, address)
    typer.echo(json.dumps(found, indent=1) if json_ else
               "\n".join(f"{key}: {value}" for key, value in found.items() if key != "metadata" and value is not None))
    _ended(found["status"])


@jobs_app.command("logs")
@_user_errors
def jobs_logs(
    job: JobId,
    follow: Annotated[bool, typer.Option(help="Stream until the job ends; exit 1 if it failed or was stopped.")] = False,
    address: JobServer = None,
) -> None:
    """A submitted job's logs (its driver's stdout and stderr).

    Example: segpipe jobs logs segpipe-label-84c23cb89526fe1e --follow
    """
    from pipeline.jobs import submit as submission

    if not follow:
        typer.echo(submission.logs(job, address), nl=False)
        return
    _ended(submission.follow(submission.connect(address), job, lambda text: typer.echo(text, nl=False)))


@jobs_app.command("stop")
@_user_errors
def jobs_stop(
    job: JobId,
    wait: Annotated[bool, typer.Option(help="Wait until it has stopped.")] = False,
    address: JobServer = None,
) -> None:
    """Stop a submitted job; submitting its spec again resumes it.

    What it committed stays.

    Example: segpipe jobs stop segpipe-label-84c23cb89526fe1e --wait
    """
    from pipeline.jobs.submit import stop

    found = stop(job, address, wait=wait)
    typer.echo(f"{job}: {found['status']}" + (" (submit the spec again to resume)" if found["status"] == "STOPPED" else ""))


@app.command(rich_help_panel=DATA)
@_user_errors
def demo(
    out: Annotated[str, typer.Option(help="Local folder for everything the demo writes; must be empty (or see --force).")] = "demo-out",
    force: Annotated[bool, typer.Option(help="Replace an earlier demo's output in OUT (only a folder holding its demo.json).")] = False,
    small: Annotated[bool, typer.Option(help="A quick run on a few small images (every step and file; the numbers mean little).")] = False,
) -> None:
    """Every stage on synthetic data, each timed, then a table of results (make demo).

    Synthesise, validate, train, label, evaluate PQ and AP, one data-engine round, the report. Progress on
    stderr, then a table of each step's seconds, result and outputs. About 4 minutes on 2 idle cores.

    Example: segpipe demo --out demo-out --force
    """
    from pipeline import demo as demo_stage

    demo_stage.prepare(out, force)
    with shown() as progress:
        summary = demo_stage.run(out, progress, settings=demo_stage.SMALL if small else demo_stage.DemoSettings())
    show_table(demo_stage.rows(summary), header=demo_stage.HEADER)
    for problem in summary.problems:
        typer.echo(f"segpipe: {problem}", err=True)
    if summary.problems:
        raise typer.Exit(1)


UsageError = typer.BadParameter.__mro__[1]
"""click's UsageError as typer bundles it (typer names no public alias): a missing option, an unknown command."""


def main() -> None:
    """The `segpipe` command: usage errors are one line and exit 2 like every other bad input; Ctrl-C exits 130."""
    import sys

    quiet_native_logs()
    try:
        code = app(standalone_mode=False)
    except UsageError as error:
        if error.format_message():  # else no arguments at all: the help was shown
            where = error.ctx.command_path.replace(error.ctx.find_root().info_name or "", "segpipe", 1) if error.ctx else "segpipe"
            typer.echo(f"segpipe: error: {error.format_message()} (see '{where} --help')", err=True)
        code = 2
    except typer.Abort:
        typer.echo("segpipe: stopped", err=True)
        code = 130
    sys.exit(code if isinstance(code, int) else 0)
