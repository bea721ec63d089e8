"""PLACEHOLDER until the lead's job specs land on main (dropped when merging main): Job and load per the contract."""

from __future__ import annotations

import hashlib
import json
import os
from dataclasses import dataclass

import yaml

from pipeline.errors import SegpipeError

_LABEL_DEFAULTS = {"image_info": None, "random_weights": False, "seed": 0, "categories": None, "weights": None, "address": None,
                   "infer": {"batch_size": 4, "actors": 1, "gpus_per_actor": 0, "cpus_per_actor": None,
                             "files_per_shard": 64, "score_threshold": None, "stuff_area": None,
                             "flip_check": False, "name": "pred"}}


@dataclass(frozen=True)
class Job:
    kind: str
    spec: dict
    path: str
    digest: str


def load(path: str) -> Job:
    try:
        with open(path, encoding="utf-8") as f:
            spec = yaml.safe_load(f)
    except OSError as error:
        raise SegpipeError(f"{path}: {error.strerror}") from None
    base = os.path.dirname(os.path.abspath(path))
    spec = {**_LABEL_DEFAULTS, **spec, "infer": {**_LABEL_DEFAULTS["infer"], **spec.get("infer", {})}}
    for key in ("input", "out", "weights", "categories"):
        if spec.get(key) and "://" not in spec[key]:
            spec[key] = os.path.join(base, spec[key])
    if "schedule" in spec:
        spec["schedule"] = {"cron": "*/15 * * * *", "lease_seconds": 900, **spec["schedule"]}
    digest = hashlib.sha256(json.dumps(spec, sort_keys=True).encode()).hexdigest()
    return Job(spec["kind"], spec, path, digest)


# check and infer_config: copied from the lead's draft of pipeline/jobs/__init__.py (same signatures)
def check(job: Job) -> None:
    """What the job reads exists: one line before any work."""
    from pipeline.io.fs import url_to_fs

    if job.kind == "engine":
        from pipeline import engine

        return engine.check_job(job.spec)
    needed = {"label": ("input", "weights", "categories", "image_info"), "eval": ("gt", "pred", "gt_dir", "pred_dir"),
              "report": ("dataset", "pred", "compare", "images", "leakage_with")}[job.kind]
    for key in needed:
        for uri in job.spec.get(key) if isinstance(job.spec.get(key), list) else [job.spec.get(key)]:
            if uri is None or (job.kind == "eval" and key == "pred" and "*" in uri):
                continue
            fs, where = url_to_fs(uri)
            if not fs.exists(where):
                raise SegpipeError(f"{job.path}: {key}: {uri}: no such file or folder")
    if job.kind == "label" and not job.spec.get("weights") and not job.spec["random_weights"]:
        raise SegpipeError(f"{job.path}: weights: give the model's checkpoint (or random_weights: true for a smoke run)")


def infer_config(job: Job, address: str | None = None, input: str | None = None, out: str | None = None):
    """The `segpipe infer` run a label job describes (over `input` into `out` when given: a schedule's tick)."""
    from pipeline import infer
    from pipeline.io.fs import read_json
    from pipeline.models import check_model_name
    from pipeline.models.base import with_checkpoint_settings

    spec, options = job.spec, job.spec["infer"]
    check_model_name(spec["model"])
    categories = None
    if spec.get("categories"):
        found = read_json(spec["categories"])
        categories = found.get("categories") if isinstance(found, dict) else None
        if not categories:
            raise SegpipeError(f"{spec['categories']}: no 'categories' list (categories)")
    given = {key: options[key] for key in ("score_threshold", "stuff_area") if options.get(key) is not None}
    settings = with_checkpoint_settings(infer.ModelSettings(
        weights=spec.get("weights"), random_weights=spec["random_weights"], seed=spec["seed"],
        categories=tuple(categories) if categories else None), spec["model"], given)
    return infer.InferConfig(
        input=input or spec["input"], out=out or spec["out"], model=spec["model"], settings=settings,
        name=options["name"], batch_size=options["batch_size"], actors=options["actors"],
        gpus_per_actor=options["gpus_per_actor"], cpus_per_actor=options["cpus_per_actor"],
        files_per_shard=options["files_per_shard"], image_info=spec.get("image_info"),
        flip_check=options["flip_check"], address=address or spec.get("address"))
