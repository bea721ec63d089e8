"""`segpipe engine`: a job's rounds on a real local Ray cluster, manifests, resuming a round, a run killed
during retrain, bad job specs."""

import json
import shutil
import subprocess
import sys
import time

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
