"""`segpipe engine`: the data engine's rounds (annotate, filter, retrain, evaluate, promote), resumable stage by stage.

    round 0:  the starting model on the held-out set (its PQ is the bar)
    round r:  infer the unlabeled pool with the current model (and, with `proposals`, SAM's proposals given
              classes by it) -> filter (rules, audit) -> [with `review`: export the doubtful for people, and
              with `wait` stop until their corrections are imported] -> train on the labeled set + the
              corrections imported so far + the kept pseudo-labels (a fixed share of each batch), from the
              current model -> infer and evaluate the held-out set -> promote the new model if its PQ drops
              by no more than the tolerance

Every stage writes under OUT/round-N/ and the round's manifest (OUT/round-N/manifest.json, atomic) records
each finished stage, its outputs and numbers; a rerun skips finished stages and resumes the unfinished one
(inference commits shards, training resumes from its last checkpoint). OUT/engine.json holds the job.
"""

from __future__ import annotations

import json
import time

from pipeline.errors import SegpipeError
from pipeline.io.fs import join, read_json, url_to_fs, write_json
from pipeline.models.base import fingerprint
from pipeline.progress import Progress, quiet

STAGES = ("annotate", "filter", "review", "retrain", "evaluate", "promote")
"""A round's stages in order; `review` only in a job that has a review section."""
DEFAULTS = {
    "infer": {"batch_size": 4, "actors": 1, "gpus_per_actor": 0.0, "flip_check": False},
    "filter": {"min_score": 0.5, "min_stability": 0.9, "min_flip_iou": None, "min_area": 16, "max_area": None,
               "min_class_agreement": None, "duplicate_iou": 0.7, "class_rules": {}, "target_precision": None,
               "tune": "min_score"},
    "train": {"steps": 300, "batch_size": 8, "pseudo_ratio": 0.5, "learning_rate": None, "workers": 1,
              "gpus_per_worker": 0.0, "seed": 0},
    "promote": {"tolerance": 0.0},
}
OPTIONAL = {  # sections a job may have; their defaults apply only where the section is given
    "proposals": {"weights": None, "random_weights": False},
    "review": {"images": 50, "margin": 0.1, "prefill": True, "formats": ["cvat", "label-studio"],
               "image_url": "/data/local-files/?d=", "wait": False},
}
PATHS = ("out", "start", "labeled", "labeled_images", "unlabeled", "heldout", "heldout_images", "audit")


def load_job(path: str) -> dict:
    """The job file, checked against schemas/engine-job.json (one line naming the first bad key and its line), with
    the defaults filled in and local relative paths made relative to the job file's folder."""
    from pipeline.jobs import checked, resolve

    job = checked(path, "engine-job")
    job = {**job, **{key: resolve(job[key], path) for key in PATHS if key in job}}
    if job.get("proposals", {}).get("weights"):
        job["proposals"] = {**job["proposals"], "weights": resolve(job["proposals"]["weights"], path)}
    return {**job, **{section: {**values, **job.get(section, {})} for section, values in DEFAULTS.items()},
            **{section: {**values, **job[section]} for section, values in OPTIONAL.items() if section in job}}


def check_job(job: dict) -> None:
    """Everything a round needs, checked before any work: the pools, their images, the starting model."""
    from pipeline.io.shards import list_shards
    from pipeline.models.base import read_checkpoint
    from pipeline.train.data import check_images, load_dataset

    for key in ("labeled", "heldout"):
        dataset = load_dataset(job[key], job.get(f"{key}_images"))
        if dataset.kind != "panoptic":
            raise SegpipeError(f"{job[key]}: {key}: the engine grows panoptic labels; give a COCO panoptic file")
        check_images(dataset)
    try:
        shards = list_shards(job["unlabeled"])
    except SegpipeError as error:
        raise SegpipeError(f"unlabeled: {error}") from None
    if not any(shard.members or shard.kind != "folder" for shard in shards):
        raise SegpipeError(f"{job['unlabeled']}: the unlabeled pool holds no images")
    read_checkpoint(job["start"], job["model"])
    proposals, rules = job.get("proposals"), job["filter"]
    needs_proposals = [key for key in ("min_class_agreement",) if rules[key] is not None]
    if rules["tune"] == "min_class_agreement" and rules["target_precision"] is not None:
        needs_proposals.append("tune: min_class_agreement")
    if needs_proposals and not proposals:
        raise SegpipeError(f"filter.{needs_proposals[0]}: needs proposals (only SAM's classified proposals have a "
                           "class agreement)")
    if proposals and (rules["min_flip_iou"] is not None or rules["tune"] == "min_flip_iou" and rules["target_precision"]
                      is not None):
        raise SegpipeError("filter.min_flip_iou: SAM's proposals have no flip agreement; drop the rule or the proposals")
    if proposals:
        if not proposals["weights"] and not proposals["random_weights"]:
            raise SegpipeError("proposals: give SAM's checkpoint as weights (it is never downloaded)")
        if proposals["weights"] and not url_to_fs(proposals["weights"])[0].exists(url_to_fs(proposals["weights"])[1]):
            raise SegpipeError(f"{proposals['weights']}: no such file (proposals.weights)")
        from pipeline.models.sam import _segment_anything

        _segment_anything()  # installed, or one line saying how
    if job.get("audit"):
        from pipeline.filtering import read_audit

        read_audit(job["audit"])


def run(job: dict, progress: Progress = quiet) -> list[dict]:
    """All of the job's rounds (resuming what OUT holds); returns the manifests, round 0 first."""
    out = job["out"].rstrip("/")
    _claim(out, job)
    manifests = [_baseline(job, out, progress)]
    for number in range(1, job["rounds"] + 1):
        manifests.append(_round(job, out, number, manifests[-1], progress))
        if manifests[-1].get("waiting"):
            break
    return manifests


def status(out: str) -> list[dict]:
    """The manifests OUT holds, round 0 first."""
    manifests = []
    for number in range(0, 10_000):
        uri = join(out, f"round-{number}", "manifest.json")
        if not url_to_fs(uri)[0].exists(url_to_fs(uri)[1]):
            break
        manifests.append(read_json(uri))
    if not manifests:
        raise SegpipeError(f"{out}: holds no engine rounds")
    return manifests


def _claim(out: str, job: dict) -> None:
    uri = join(out, "engine.json")
    fs, path = url_to_fs(uri)
    if fs.exists(path):
        stored = read_json(uri)  # with the defaults of this version (a key added since reads as its default)
        stored.update({section: {**values, **stored.get(section, {})} for section, values in DEFAULTS.items()})
        stored.update({section: {**values, **stored[section]} for section, values in OPTIONAL.items() if section in stored})
        if stored != json.loads(json.dumps(job)):
            raise SegpipeError(f"{out}: holds another engine job; use another out, or delete it to start over")
        return
    write_json(uri, job)


def _baseline(job: dict, out: str, progress: Progress) -> dict:
    uri = join(out, "round-0", "manifest.json")
    if url_to_fs(uri)[0].exists(url_to_fs(uri)[1]):
        return read_json(uri)
    progress("round 0: the starting model on the held-out set", 0, _steps(job))
    heldout = _heldout(job, job["start"], join(out, "round-0", "heldout"))
    manifest = {"round": 0, "model": job["start"], "heldout": heldout, "promoted": True, "current": job["start"]}
    write_json(uri, manifest)
    return manifest


def _round(job: dict, out: str, number: int, previous: dict, progress: Progress) -> dict:
    folder = join(out, f"round-{number}")
    uri = join(folder, "manifest.json")
    fs, path = url_to_fs(uri)
    manifest = read_json(uri) if fs.exists(path) else {"round": number, "model_in": previous["current"],
                                                       "bar": previous["heldout"]["pq"] if previous["promoted"]
                                                       else previous["bar"], "stages": {}}
    current = manifest["model_in"]
    manifest.pop("waiting", None)
    for index, stage in enumerate(stages(job)):
        if manifest["stages"].get(stage, {}).get("state") == "done":
            continue
        if (stage == "retrain" and job.get("review", {}).get("wait") and manifest["review_export"]["images"]
                and not _imported(folder)):
            progress(f"round {number}: waiting for review: correct {join(folder, 'review')} in CVAT or Label "
                     f"Studio, then `segpipe engine review {out} {number} CORRECTED.json` and run the job again")
            manifest["waiting"] = True
            _save(uri, manifest)
            return manifest
        progress(f"round {number}: {stage}", 1 + (number - 1) * len(stages(job)) + index, _steps(job))
        start = time.perf_counter()
        if stage == "retrain":  # training's own reports (its steps, "resumed at step S of N") as lines under the stage's
            manifest.update(_retrain(job, folder, current, manifest,
                                     lambda what, done=None, total=None: progress(f"round {number}: retrain: {what}")))
        else:
            manifest.update(_STAGE[stage](job, folder, current, manifest))
        manifest["stages"][stage] = {"state": "done", "seconds": round(time.perf_counter() - start, 1)}
        _save(uri, manifest)
    return manifest


def _save(uri: str, manifest: dict) -> None:
    """Write the round's manifest, keeping the review counts `segpipe engine review` may have added meanwhile."""
    fs, path = url_to_fs(uri)
    if fs.exists(path) and "reviewed" in (on_disk := read_json(uri)):
        manifest["reviewed"] = on_disk["reviewed"]
    write_json(uri, manifest)


def _steps(job: dict) -> int:
    """The job's steps for a progress bar: round 0's evaluation, then every round's stages."""
    return 1 + job["rounds"] * len(stages(job))


def stages(job: dict) -> tuple[str, ...]:
    """The job's round stages, in order."""
    return tuple(stage for stage in STAGES if stage != "review" or "review" in job)


def _annotate(job: dict, folder: str, current: str, manifest: dict) -> dict:
    from pipeline.infer import InferConfig
    from pipeline.infer import run as infer
    from pipeline.models import ModelSettings
    from pipeline.models.base import ProposalSettings, with_checkpoint_settings

    settings = with_checkpoint_settings(ModelSettings(weights=current), job["model"], {})
    options = job["infer"]
    common = {"input": job["unlabeled"], "batch_size": options["batch_size"], "actors": options["actors"],
              "gpus_per_actor": options["gpus_per_actor"], "address": job.get("address")}
    summary = infer(InferConfig(out=join(folder, "infer"), model=job["model"], settings=settings,
                                flip_check=options["flip_check"], **common))
    result = {"annotated": {"images": summary.images, "segments": summary.segments, "failed": summary.failed}}
    if "proposals" in job:
        from pipeline.proposals import run as classify

        sam = dict(job["proposals"])
        settings = ModelSettings(weights=sam.pop("weights"), random_weights=sam.pop("random_weights"),
                                 proposals=ProposalSettings(**{k: v for k, v in sam.items() if k != "model"}))
        made = infer(InferConfig(out=join(folder, "proposals"), model=sam["model"], settings=settings, **common))
        counts = classify(join(folder, "proposals"), join(folder, "infer"), join(folder, "classified"))["counts"]
        result["proposals"] = {"model": sam["model"], "proposals": made.segments, "failed": made.failed,
                               "classified": counts["classified"], "unclassified": counts["unclassified"]}
    return result


def _candidates(job: dict, folder: str) -> str:
    """What the filter chooses from: SAM's classified proposals, or the current model's own segments."""
    return join(folder, "classified" if "proposals" in job else "infer")


def _filter(job: dict, folder: str, current: str, manifest: dict) -> dict:
    from pipeline.filtering import FilterRules, Thresholds
    from pipeline.filtering import run as filter_run

    options = job["filter"]
    thresholds = Thresholds(options["min_score"], options["min_stability"], options["min_flip_iou"],
                            options["min_area"], options["max_area"], options["min_class_agreement"])
    per_class = (FilterRules.parse_per_class(json.dumps(options["class_rules"]), thresholds)
                 if options["class_rules"] else {})
    rules = FilterRules(thresholds, per_class, options["duplicate_iou"])
    target = (options["tune"], options["target_precision"]) if options["target_precision"] is not None else None
    summary = filter_run(_candidates(job, folder), join(folder, "filter"), rules, job.get("audit"), target)
    kept = summary.get("audit", {}).get("kept", {})
    return {"filter": {"candidates": summary["candidates"], "kept": summary["kept"], "rejected": summary["rejected"],
                       "audit_precision": kept.get("precision"), "audit_recall": kept.get("recall"),
                       "audit_per_rule": {rule: figures["precision"] for rule, figures in
                                          summary.get("audit", {}).get("per_rule", {}).items()}}}


def _review(job: dict, folder: str, current: str, manifest: dict) -> dict:
    from pipeline.review import ExportConfig, NothingToReview, export

    options = job["review"]
    try:
        exported = export(ExportConfig(filtered=join(folder, "filter"), out=join(folder, "review"),
                                       images=options["images"], margin=options["margin"], prefill=options["prefill"],
                                       formats=tuple(options["formats"]), image_url=options["image_url"]))
    except NothingToReview:  # no near miss this round: nothing to export, nothing to wait for
        return {"review_export": {"images": 0, "masks": {"borderline": 0, "kept": 0, "empty_left_out": 0}}}
    return {"review_export": {"images": len(exported["images"]), "masks": exported["masks"]}}


def _imported(folder: str) -> bool:
    """Whether people's corrections of the round's review export have been imported (wholly: run.json is the
    import's last file)."""
    fs, path = url_to_fs(join(folder, "reviewed", "run.json"))
    return fs.exists(path)


def _reviewed_labels(folder: str) -> bool:
    """Whether the round's imported corrections hold any mask (a review that deleted everything holds none)."""
    return _imported(folder) and read_json(join(folder, "reviewed", "review.json"))["returned_masks"] > 0


def import_review(out: str, number: int, corrected: str) -> dict:
    """`segpipe engine review`: people's corrections of round `number`'s export become OUT/round-N/reviewed
    (human labels for this round's retrain, if it has not started, and every later round's); the counts of
    accepted, changed, deleted and added masks go into the round's manifest."""
    from pipeline.review import import_review as read_corrections

    folder = join(out.rstrip("/"), f"round-{number}")
    uri = join(folder, "manifest.json")
    if not url_to_fs(uri)[0].exists(url_to_fs(uri)[1]) or "review" not in read_json(uri).get("stages", {}):
        raise SegpipeError(f"{folder}: no review export to import corrections for (is the job's review on, and "
                           "has the round filtered?)")
    if not read_json(uri)["review_export"]["images"]:
        raise SegpipeError(f"{folder}: its review export is empty (no near miss that round)")
    manifest = read_json(uri)
    if _imported(folder):
        if "reviewed" in manifest:
            raise SegpipeError(f"{folder}: its review was imported already ({join(folder, 'reviewed')})")
        summary = read_json(join(folder, "reviewed", "review.json"))  # imported, but stopped before the manifest
    else:
        summary = read_corrections(join(folder, "review"), corrected, join(folder, "reviewed"))
        manifest = read_json(uri)
    manifest["reviewed"] = {k: summary[k] for k in ("accepted", "changed", "deleted", "added")}
    write_json(uri, manifest)
    return summary


def _retrain(job: dict, folder: str, current: str, manifest: dict, progress: Progress = quiet) -> dict:
    from pipeline.train import TrainConfig
    from pipeline.train import run as train

    options = job["train"]
    out = join(folder, "train")
    resume = url_to_fs(join(out, "train.json"))[0].exists(url_to_fs(join(out, "train.json"))[1])
    if manifest["filter"]["kept"] == 0:
        raise SegpipeError(f"{folder}: the filter kept no pseudo-label; loosen its rules")
    if "reviewed_labels" not in manifest:  # fixed when the stage first starts, so a resumed retrain sees the same
        root = folder.rsplit("/", 1)[0]
        manifest["reviewed_labels"] = [join(root, f"round-{r}", "reviewed") for r in range(1, manifest["round"] + 1)
                                       if _reviewed_labels(join(root, f"round-{r}"))]
        _save(join(folder, "manifest.json"), manifest)
    result = train(TrainConfig(train=job["labeled"], val=job["heldout"], model=job["model"], out=out, init=current,
                               train_images=job.get("labeled_images"), val_images=job.get("heldout_images"),
                               more_train=tuple(manifest["reviewed_labels"]),
                               pseudo=(join(folder, "filter"),), pseudo_ratio=options["pseudo_ratio"],
                               steps=options["steps"], batch_size=options["batch_size"],
                               learning_rate=options["learning_rate"], workers=options["workers"],
                               gpus_per_worker=options["gpus_per_worker"], seed=options["seed"], resume=resume,
                               address=job.get("address")), progress=progress)
    return {"trained": {"model": result.model, "steps": result.steps,
                        "fingerprint": fingerprint(result.model, job["model"])}}


def _evaluate(job: dict, folder: str, current: str, manifest: dict) -> dict:
    return {"heldout": _heldout(job, manifest["trained"]["model"], join(folder, "heldout"))}


def _promote(job: dict, folder: str, current: str, manifest: dict) -> dict:
    promoted = manifest["heldout"]["pq"] >= manifest["bar"] - job["promote"]["tolerance"]
    return {"promoted": promoted, "current": manifest["trained"]["model"] if promoted else current}


_STAGE = {"annotate": _annotate, "filter": _filter, "review": _review, "retrain": _retrain, "evaluate": _evaluate,
          "promote": _promote}


def _heldout(job: dict, model: str, out: str) -> dict:
    """PQ of `model` on the held-out set: `segpipe infer` with its validated settings, then `segpipe eval pq`."""
    from pipeline.evaluate.pq import evaluate_pq
    from pipeline.infer import InferConfig
    from pipeline.infer import run as infer
    from pipeline.models import ModelSettings
    from pipeline.models.base import with_checkpoint_settings
    from pipeline.train.data import load_dataset

    images = load_dataset(job["heldout"], job.get("heldout_images")).images
    settings = with_checkpoint_settings(ModelSettings(weights=model), job["model"], {})
    infer(InferConfig(input=images, out=out, model=job["model"], settings=settings, image_info=job["heldout"],
                      batch_size=job["infer"]["batch_size"], actors=job["infer"]["actors"],
                      gpus_per_actor=job["infer"]["gpus_per_actor"], address=job.get("address")))
    result = evaluate_pq(job["heldout"], join(out, "panoptic_pred.json"), drop_unknown_categories=True)
    return {"pq": result["All"]["pq"], "sq": result["All"]["sq"], "rq": result["All"]["rq"],
            "pq_things": result["Things"]["pq"], "pq_stuff": result["Stuff"]["pq"], "model": model,
            "fingerprint": fingerprint(model, job["model"])}


def table(manifests: list[dict]) -> str:
    """The rounds as `segpipe engine status` prints them (review: accepted / changed / deleted / added)."""
    lines = [f"{'round':>5} {'candidates':>10} {'kept':>6} {'audit P':>7} {'review A/C/D/+':>15} {'held-out PQ':>11} "
             f"{'promoted':>8}"]
    for m in manifests:
        f = m.get("filter", {})
        precision = f.get("audit_precision")
        pq = m.get("heldout", {}).get("pq")
        review = "/".join(str(m["reviewed"][k]) for k in ("accepted", "changed", "deleted", "added")) \
            if "reviewed" in m else ("waiting" if m.get("waiting") else "-")
        state = ("yes" if m["promoted"] else "no") if "promoted" in m else "running"
        lines.append(f"{m['round']:>5} {f.get('candidates', '-'):>10} {f.get('kept', '-'):>6} "
                     f"{'-' if precision is None else f'{precision:.3f}':>7} {review:>15} "
                     f"{'-' if pq is None else f'{pq:.4f}':>11} {state:>8}")
    return "\n".join(lines)
