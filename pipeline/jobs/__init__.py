"""Job specs: one YAML file per piece of work (label, eval, engine, report), checked against schemas/<kind>-job.json
with errors that name the key and the line, then run here (`segpipe run`), on a cluster (`segpipe submit`) or on
a schedule (`segpipe schedule`)."""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from importlib import resources
from pathlib import Path
from typing import Any

from pipeline.errors import SegpipeError
from pipeline.progress import Progress, quiet

KINDS = ("label", "eval", "engine", "report")
PATHS = {  # the keys of each kind that name data: local relative paths are relative to the spec file
    "label": ("input", "out", "weights", "categories", "image_info"),
    "eval": ("gt", "pred", "out", "gt_dir", "pred_dir", "classes"),
    "report": ("dataset", "out", "pred", "compare", "images", "leakage_with"),
}


@dataclass(frozen=True)
class Job:
    """A checked job spec: its kind, its settings (defaults filled in, paths resolved) and where it came from."""

    kind: str
    spec: dict
    path: str

    @property
    def digest(self) -> str:
        """sha256 of the spec's canonical JSON: the identity of the work (equal specs, equal digests)."""
        return hashlib.sha256(json.dumps(self.spec, sort_keys=True, separators=(",", ":")).encode()).hexdigest()


def _lines(node, path: tuple = (), found: dict | None = None) -> dict[tuple, int]:
    """Every key path of a composed YAML document -> the 1-based line it starts on."""
    import yaml

    found = {} if found is None else found
    found.setdefault(path, node.start_mark.line + 1)
    if isinstance(node, yaml.MappingNode):
        for key, value in node.value:
            found[(*path, key.value)] = key.start_mark.line + 1
            _lines(value, (*path, key.value), found)
    elif isinstance(node, yaml.SequenceNode):
        for index, value in enumerate(node.value):
            _lines(value, (*path, index), found)
    return found


def _filled(value: Any, schema: dict) -> Any:
    """`value` with the schema's defaults for the properties it leaves out, in nested objects too."""
    if not isinstance(value, dict) or "properties" not in schema:
        return value
    return {**{key: _filled(sub["default"], sub) for key, sub in schema["properties"].items() if "default" in sub and key not in value},
            **{key: _filled(item, schema["properties"].get(key, {})) for key, item in value.items()}}


def _text(path: str) -> str:
    """The spec's text, if it is YAML at all (else one line with the line of the first problem)."""
    import yaml

    from pipeline.io.fs import read_bytes

    try:
        text = read_bytes(path).decode()
        yaml.compose(text)
    except FileNotFoundError:
        raise SegpipeError(f"{path}: no such job spec") from None
    except UnicodeDecodeError as error:
        raise SegpipeError(f"{path}: not YAML ({error.reason} at byte {error.start})") from None
    except yaml.YAMLError as error:
        mark = getattr(error, "problem_mark", None)
        raise SegpipeError(f"{path}:{mark.line + 1 if mark else 1}: not YAML "
                           f"({getattr(error, 'problem', None) or str(error).splitlines()[0]})") from None
    return text


def checked(path: str, schema_name: str) -> dict:
    """The YAML document at `path`, checked against schemas/<schema_name>.json: the first problem is one
    SegpipeError naming the file, the line and the key; the schema's defaults are filled in."""
    import jsonschema
    import yaml

    text = _text(path)
    document, lines = yaml.safe_load(text), _lines(yaml.compose(text) or yaml.compose("{}"))
    schema = json.loads(resources.files("pipeline.schemas").joinpath(f"{schema_name}.json").read_text())
    errors = sorted(jsonschema.Draft202012Validator(schema).iter_errors(document),
                    key=lambda e: (lines.get(tuple(e.absolute_path), 0), list(map(str, e.absolute_path))))
    if errors:
        error, where = errors[0], tuple(errors[0].absolute_path)
        if error.validator == "additionalProperties":
            known = error.schema.get("properties", {})
            unknown = sorted(set(error.instance) - set(known))[0]
            key = (*where, unknown)
            raise SegpipeError(f"{path}:{lines.get(key, 1)}: unknown key {'.'.join(map(str, key))!r}; known: "
                               f"{', '.join(known)}")
        if error.validator == "required":
            raise SegpipeError(f"{path}:{lines.get(where, 1)}: {error.message} in {'.'.join(map(str, where)) or 'the job'}")
        raise SegpipeError(f"{path}:{lines.get(where, 1)}: {'.'.join(map(str, where)) or 'the job'}: {error.message}")
    return _filled(document, schema)


def resolve(uri: str, base: str) -> str:
    """A local relative path made relative to `base`'s folder (the spec file's); URIs and absolute paths as given."""
    if "://" in uri or "://" in base or Path(uri).is_absolute():
        return uri
    return str((Path(base).parent / uri).resolve())


def load(path: str) -> Job:
    """The job spec at `path`, checked (one line naming the key and the line), defaults filled, paths resolved."""
    import yaml

    head = yaml.safe_load(_text(path))
    kind = head.get("kind") if isinstance(head, dict) else None
    if kind not in KINDS:
        raise SegpipeError(f"{path}: kind: {'missing' if kind is None else repr(kind)}; one of {', '.join(KINDS)}")
    if kind == "engine":
        from pipeline import engine

        return Job(kind, engine.load_job(path), path)
    spec = checked(path, f"{kind}-job")
    for key in PATHS[kind]:
        if isinstance(spec.get(key), str):
            spec[key] = resolve(spec[key], path)
        elif isinstance(spec.get(key), list):
            spec[key] = [resolve(uri, path) for uri in spec[key]]
    return Job(kind, spec, path)


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


def run(job: Job, address: str | None = None, progress: Progress = quiet) -> int:
    """Run the job here (a local Ray, or `address`); returns the exit code: 0 done, 1 it ran and found failures."""
    check(job)
    return {"label": _label, "eval": _eval, "engine": _engine, "report": _report}[job.kind](job, address, progress)


def _label(job: Job, address: str | None, progress: Progress) -> int:
    from pipeline.jobs import schedule

    summary = schedule.tick(job, address, progress=progress)  # one tick: what no earlier run committed
    progress(schedule.describe(summary))
    return summary.exit_code


def _eval(job: Job, address: str | None, progress: Progress) -> int:
    from pipeline.io.fs import write_json

    spec = job.spec
    common = {"workers": spec["workers"], "address": address or spec.get("address"), "progress": progress}
    if spec["metric"] == "pq":
        from pipeline.evaluate.pq import evaluate_pq as evaluate, format_table
        result = evaluate(spec["gt"], spec["pred"], gt_dir=spec.get("gt_dir"), pred_dir=spec.get("pred_dir"),
                          drop_unknown_categories=spec["drop_unknown_categories"], **common)
    elif spec["metric"] == "ap":
        from pipeline.evaluate.ap import evaluate_ap as evaluate, format_table
        result = evaluate(spec["gt"], spec["pred"], iou_type=spec["iou_type"],
                          drop_unknown_categories=spec["drop_unknown_categories"], **common)
    else:
        from pipeline.evaluate.miou import evaluate_miou as evaluate, format_table
        result = evaluate(spec["gt"], spec["pred"], classes=spec.get("classes"), ignore_index=spec["ignore_index"],
                          gt_dir=spec.get("gt_dir"), pred_dir=spec.get("pred_dir"), **common)
    write_json(spec["out"], result)
    progress(format_table(result))
    progress(f"results in {spec['out']}")
    return 0


def _engine(job: Job, address: str | None, progress: Progress) -> int:
    from pipeline import engine

    spec = {**job.spec, "address": address or job.spec.get("address")}
    manifests = engine.run(spec, progress=progress)
    progress(engine.table(manifests))
    return 0


def _report(job: Job, address: str | None, progress: Progress) -> int:
    from pipeline.report import ReportConfig, run as report

    spec = job.spec
    result = report(ReportConfig(
        dataset=spec["dataset"], out=spec["out"], pred=spec.get("pred"), compare=spec.get("compare"),
        images=spec.get("images"), workers=spec["workers"], address=address or spec.get("address"),
        shard_size=spec["shard_size"], resamples=spec["resamples"], seed=spec["seed"], thumbnails=spec["thumbnails"],
        leakage_with=tuple(spec["leakage_with"])), progress=progress)
    progress(f"report: {result.html}")
    return 0
