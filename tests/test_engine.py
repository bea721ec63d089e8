"""`segpipe engine`: a job's rounds on a real local Ray cluster, manifests, resuming a round, a run killed
during retrain, bad job specs."""

import json
import shutil
import subprocess
import sys
import time

import pyarrow.parquet as pq
import pytest
import torch
import yaml
from typer.testing import CliRunner

from pipeline.cli import app
from pipeline.models import ModelSettings, load_model
from pipeline.synth import categories

runner = CliRunner()


@pytest.fixture(scope="module")
def cluster():
    import ray

    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False)
    yield
    ray.shutdown()


@pytest.fixture
def job(dataset, tmp_path):
    """A job over the synthetic split: its images are the unlabeled pool, its labels the labeled, held-out and
    audit sets (the mechanics, not a measurement); the start is a random segpipe_small checkpoint."""
    model = load_model("segpipe_small", ModelSettings(random_weights=True, categories=tuple(categories())))
    torch.save({"model": model.module.state_dict(), "categories": list(model.categories),
                "settings": {"fusion": {"stuff_area_threshold": 64}}}, tmp_path / "start.pt")
    labels = str(dataset / "annotations" / "panoptic_val.json")
    spec = {"out": "rounds", "model": "segpipe_small", "start": "start.pt", "labeled": labels,
            "unlabeled": str(dataset / "val"), "heldout": labels, "audit": labels, "rounds": 2,
            "filter": {"min_score": None, "min_stability": None, "min_area": 400},
            "train": {"steps": 2, "batch_size": 2, "pseudo_ratio": 0.5},
            "promote": {"tolerance": 1.0}}  # a random model's PQ is noise: promote unless it falls by more than 1
    path = tmp_path / "job.yaml"
    path.write_text(yaml.safe_dump(spec))
    return path


def test_two_rounds_run_record_their_manifests_and_a_rerun_resumes_at_the_unfinished_stage(cluster, job, tmp_path):
    result = runner.invoke(app, ["engine", "run", str(job)])
    assert result.exit_code == 0, result.output
    out = tmp_path / "rounds"  # relative to the job file
    manifests = [json.loads((out / f"round-{r}" / "manifest.json").read_text()) for r in range(3)]
    assert manifests[0]["current"] == str(tmp_path / "start.pt") and 0 <= manifests[0]["heldout"]["pq"] <= 1
    for number, manifest in enumerate(manifests[1:], 1):
        assert list(manifest["stages"]) == ["annotate", "filter", "retrain", "evaluate", "promote"]
        assert manifest["annotated"]["images"] == 12 and manifest["filter"]["candidates"] > manifest["filter"]["kept"] > 0
        assert 0 <= manifest["filter"]["audit_precision"] <= 1
        assert manifest["trained"]["model"] == str(out / f"round-{number}" / "train" / "model.pt")
        assert manifest["promoted"] and manifest["current"] == manifest["trained"]["model"]  # tolerance 1
        train = json.loads((out / f"round-{number}" / "train" / "train.json").read_text())
        assert train["init"] == manifest["model_in"] and train["pseudo_ratio"] == 0.5
        assert train["pseudo"][0]["uri"] == str(out / f"round-{number}" / "filter")
    assert manifests[2]["model_in"] == manifests[1]["current"]  # round 2 starts from round 1's promoted model
    assert manifests[2]["bar"] == manifests[1]["heldout"]["pq"]
    status = runner.invoke(app, ["engine", "status", str(out)])
    assert status.exit_code == 0 and len(status.stdout.strip().splitlines()) == 4, status.output
    # Killed after retraining round 2: the rerun evaluates and decides again, and finds what the first run found.
    kept = {k: v for k, v in manifests[2]["stages"].items() if k in ("annotate", "filter", "retrain")}
    (out / "round-2" / "manifest.json").write_text(json.dumps({**manifests[2], "stages": kept}))
    again = runner.invoke(app, ["engine", "run", str(job)])
    assert again.exit_code == 0, again.output
    assert "round 2: evaluate" in again.stderr and "round 2: retrain" not in again.stderr and "round 1" not in again.stderr
    resumed = json.loads((out / "round-2" / "manifest.json").read_text())
    assert {k: v for k, v in resumed.items() if k != "stages"} == {k: v for k, v in manifests[2].items() if k != "stages"}


def test_a_bad_job_is_one_line_before_any_work(dataset, job, tmp_path):
    spec = yaml.safe_load(job.read_text())
    (tmp_path / "empty").mkdir()
    cases = [
        ({**spec, "rounds_": 2}, "unknown key 'rounds_'"),
        ({**spec, "filter": {"min_scor": 0.5}}, "unknown key 'filter.min_scor'"),
        ({**spec, "rounds": "two"}, "rounds: 'two' is not of type 'integer'"),
        ({**spec, "train": {"pseudo_ratio": 2}}, "train.pseudo_ratio: 2 is greater than the maximum of 1"),
        ({k: v for k, v in spec.items() if k != "heldout"}, "'heldout' is a required property"),
        ({**spec, "labeled": str(tmp_path / "missing.json")}, "missing.json: no such file"),
        ({**spec, "unlabeled": str(tmp_path / "empty")}, "empty: holds no images"),
        ({**spec, "start": str(tmp_path / "none.pt")}, "none.pt: no such file"),
        ({**spec, "labeled": str(dataset / "annotations" / "instances_val.json")}, "give a COCO panoptic file"),
        ({**spec, "proposals": {"model": "sam_vit_b"}}, "proposals: give SAM's checkpoint as weights"),
        ({**spec, "proposals": {"model": "sam_vit_b", "weights": "none.pth"}}, "none.pth: no such file (proposals.weights)"),
        ({**spec, "proposals": {"model": "sam_vit_x", "weights": "x.pth"}}, "proposals.model: 'sam_vit_x' is not one of"),
        ({**spec, "review": {"wait": "yes"}}, "review.wait: 'yes' is not of type 'boolean'"),
        ({**spec, "filter": {"min_class_agreement": 0.5}}, "filter.min_class_agreement: needs proposals"),
        ({**spec, "filter": {"min_flip_iou": 0.5}, "proposals": {"model": "sam_vit_b", "random_weights": True}},
         "filter.min_flip_iou: SAM's proposals have no flip agreement"),
        ({**spec, "review": {"formats": ["cvat", "labelbox"]}}, "review.formats.1: 'labelbox' is not one of"),
    ]
    for content, message in cases:
        job.write_text(yaml.safe_dump(content))
        result = runner.invoke(app, ["engine", "run", str(job)])
        assert result.exit_code == 2 and message in result.stderr and result.stderr.count("\n") == 1, (message, result.output)
    job.write_text("rounds: [")
    result = runner.invoke(app, ["engine", "run", str(job)])
    assert result.exit_code == 2 and "not YAML" in result.stderr
    assert not (tmp_path / "rounds").exists()  # nothing was started


def test_the_example_job_is_a_valid_job():
    from pathlib import Path

    from pipeline.engine import load_job

    spec = load_job(str(Path(__file__).parent.parent / "jobs" / "engine.yaml"))
    assert spec["rounds"] == 2 and spec["train"]["pseudo_ratio"] == 0.5 and spec["out"].endswith("engine-out")


def test_an_engine_killed_during_retrain_resumes_there_and_ends_as_an_unbroken_one(job, tmp_path, kill_session):
    """SIGKILL to every process of the engine's session (driver, Ray's daemons, the training worker) once
    retraining has checkpointed; the rerun resumes at retrain, from training's last checkpoint, and every
    manifest and model is what an unbroken run in the same place wrote (weights bit for bit)."""
    spec = yaml.safe_load(job.read_text())
    job.write_text(yaml.safe_dump({**spec, "rounds": 1, "train": {**spec["train"], "steps": 20}}))  # checkpoints every 4
    command = [sys.executable, "-m", "pipeline", "engine", "run", str(job)]
    out = tmp_path / "rounds"
    done = subprocess.run(command, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-2000:]
    shutil.move(out, tmp_path / "unbroken")

    process = subprocess.Popen(command, start_new_session=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    snapshot = out / "round-1" / "train" / "checkpoints" / "checkpoint_manager_snapshot.json"

    def latest() -> int:
        try:
            return json.loads(snapshot.read_text())["latest_checkpoint_result"]["metrics"]["step"]
        except (FileNotFoundError, json.JSONDecodeError, TypeError):
            return 0
    deadline = time.monotonic() + 400
    while time.monotonic() < deadline and process.poll() is None and latest() < 8:
        time.sleep(0.2)
    assert process.poll() is None, "the engine ended before it could be killed"
    assert kill_session(process.pid) >= 4
    process.wait()
    stages, saved = json.loads((out / "round-1" / "manifest.json").read_text())["stages"], latest()
    assert list(stages) == ["annotate", "filter"] and 8 <= saved < 20  # killed inside retrain
    again = subprocess.run(command, capture_output=True, text=True, timeout=600)
    assert again.returncode == 0, again.stderr[-2000:]
    said = again.stdout + again.stderr
    assert "round 1: retrain" in said and "round 1: filter" not in said and "round 0" not in said
    assert f"resumed at step {saved} of 20" in said

    def outcome(root):
        manifests = [json.loads((root / f"round-{r}" / "manifest.json").read_text()) for r in (0, 1)]
        for manifest in manifests:  # everything but the stages' wall-clock seconds
            manifest["stages"] = {k: v["state"] for k, v in manifest.get("stages", {}).items()}
        weights = torch.load(root / "round-1" / "train" / "model.pt", weights_only=True)
        return manifests, weights, (root / "round-1" / "train" / "metrics.json").read_text()
    resumed, unbroken = outcome(out), outcome(tmp_path / "unbroken")
    assert resumed[0] == unbroken[0]  # incl. the trained model's fingerprint (its weights) and held-out PQ
    assert resumed[0][1]["stages"] == dict.fromkeys(["annotate", "filter", "retrain", "evaluate", "promote"], "done")
    assert resumed[2] == unbroken[2]
    assert resumed[1].keys() == unbroken[1].keys()
    assert all(torch.equal(resumed[1]["model"][k], unbroken[1]["model"][k]) for k in unbroken[1]["model"])


def test_a_round_hands_the_doubtful_to_people_waits_and_trains_on_their_corrections(cluster, job, tmp_path):
    """Review on, with wait: round 1 exports for CVAT and stops; a simulated reviewer deletes a mask, moves one,
    adds one (and CVAT renumbers images and labels); `engine review` imports it with the right counts, and the
    rerun's retrain takes the corrections as human labels."""
    import numpy as np

    from pipeline.structures import Rle

    spec = yaml.safe_load(job.read_text())
    # The random start model scores every segment 0.12 to 0.15: half fall under min_score 0.129, just under it
    # (borderline at margin 0.1), the rest are kept.
    job.write_text(yaml.safe_dump({**spec, "rounds": 1, "filter": {**spec["filter"], "min_score": 0.129},
                                   "review": {"images": 2, "margin": 0.1, "formats": ["cvat"], "wait": True}}))
    first = runner.invoke(app, ["engine", "run", str(job)])
    assert first.exit_code == 0, first.output
    assert "round 1: waiting for review" in first.stderr and "round 1: retrain" not in first.stderr
    out = tmp_path / "rounds"
    manifest = json.loads((out / "round-1" / "manifest.json").read_text())
    assert list(manifest["stages"]) == ["annotate", "filter", "review"] and manifest["review_export"]["images"] == 2
    assert manifest["waiting"] and "waiting" in runner.invoke(app, ["engine", "status", str(out)]).stdout
    coco = json.loads((out / "round-1" / "review" / "cvat" / "instances.json").read_text())
    exported = len(coco["annotations"])
    assert exported >= 3 and len(coco["images"]) == 2

    # The reviewer: deletes the first mask, moves the largest 2 px right, draws a 6 x 6 object in a corner.
    annotations = coco["annotations"][1:]
    largest = max(annotations, key=lambda a: a["area"])
    image = next(im for im in coco["images"] if im["id"] == largest["image_id"])
    size = (image["height"], image["width"])
    moved = Rle.from_mask(np.roll(Rle.from_coco(largest["segmentation"], *size).to_mask(), 2, axis=1))
    largest.update(segmentation=moved.to_coco(), area=moved.area(), bbox=list(moved.bbox()))
    drawn = np.zeros(size, bool)
    drawn[:6, :6] = True
    new = Rle.from_mask(np.asfortranarray(drawn))
    annotations.append({"id": 999, "image_id": image["id"], "category_id": largest["category_id"], "iscrowd": 1,
                        "segmentation": new.to_coco(), "area": new.area(), "bbox": list(new.bbox())})
    image_ids = {im["id"]: k + 1 for k, im in enumerate(coco["images"])}  # CVAT numbers its own way
    label_ids = {c["id"]: k + 1 for k, c in enumerate(coco["categories"])}
    for a in annotations:
        a["image_id"], a["category_id"] = image_ids[a["image_id"]], label_ids[a["category_id"]]
    corrected = tmp_path / "instances_default.json"
    corrected.write_text(json.dumps({**coco, "annotations": annotations,
                                     "images": [{**im, "id": image_ids[im["id"]]} for im in coco["images"]],
                                     "categories": [{**c, "id": label_ids[c["id"]]} for c in coco["categories"]]}))

    imported = runner.invoke(app, ["engine", "review", str(out), "1", str(corrected)])
    assert imported.exit_code == 0, imported.output
    counts = {"accepted": exported - 2, "changed": 1, "deleted": 1, "added": 1}
    assert json.loads((out / "round-1" / "manifest.json").read_text())["reviewed"] == counts
    again = runner.invoke(app, ["engine", "review", str(out), "1", str(corrected)])
    assert again.exit_code == 2 and "imported already" in again.stderr

    second = runner.invoke(app, ["engine", "run", str(job)])
    assert second.exit_code == 0, second.output
    assert "round 1: retrain" in second.stderr and "round 1: filter" not in second.stderr
    manifest = json.loads((out / "round-1" / "manifest.json").read_text())
    assert manifest["reviewed_labels"] == [str(out / "round-1" / "reviewed")] and manifest["reviewed"] == counts
    train = json.loads((out / "round-1" / "train" / "train.json").read_text())
    assert [source["uri"] for source in train["more_train"]] == [str(out / "round-1" / "reviewed")]
    assert f"{counts['accepted']}/1/1/1" in runner.invoke(app, ["engine", "status", str(out)]).stdout


def test_a_round_can_annotate_with_sam_proposals_given_classes_by_the_current_model(cluster, job, tmp_path):
    """proposals on: a random SAM ViT-B (nothing downloaded) over a 2-image pool, 2 x 2 prompts, every mask kept;
    the current model classifies them, the filter chooses among the classified proposals, retrain trains on them."""
    from pipeline.io.shards import list_shards, read_shard

    spec = yaml.safe_load(job.read_text())
    (tmp_path / "pool").mkdir()
    records = [r for shard in list_shards(spec["unlabeled"]) for r in read_shard(shard)][:2]
    for record in records:
        (tmp_path / "pool" / record.key).write_bytes(record.data)
    job.write_text(yaml.safe_dump({
        **{k: v for k, v in spec.items() if k != "audit"}, "rounds": 1, "unlabeled": str(tmp_path / "pool"),
        "filter": {"min_score": None, "min_stability": None, "min_area": 16, "min_class_agreement": 0.2},
        "proposals": {"model": "sam_vit_b", "random_weights": True, "points_per_side": 2, "pred_iou_thresh": 0.0,
                      "stability_score_thresh": 0.0, "box_nms_thresh": 1.0}}))
    result = runner.invoke(app, ["engine", "run", str(job)])
    assert result.exit_code == 0, result.output
    out = tmp_path / "rounds" / "round-1"
    manifest = json.loads((out / "manifest.json").read_text())
    proposals = manifest["proposals"]
    assert proposals["model"] == "sam_vit_b" and proposals["proposals"] == 2 * 4 * 3  # 2 images x 4 prompts x 3
    assert proposals["classified"] + proposals["unclassified"] == proposals["proposals"]
    assert manifest["filter"]["candidates"] == proposals["classified"]  # the filter chose among SAM's proposals
    decisions = pq.read_table(out / "filter" / "decisions").to_pylist()
    assert all((d["class_agreement"] >= 0.2) == (d["rejected_by"] != "min_class_agreement") for d in decisions
               if d["rejected_by"] in (None, "min_class_agreement"))
    train = json.loads((out / "train" / "train.json").read_text())
    assert train["pseudo"][0]["uri"] == str(out / "filter") and manifest["stages"]["promote"]["state"] == "done"
