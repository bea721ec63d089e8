"""`segpipe train` on a real local Ray cluster: 2 DDP workers, checkpoints that `segpipe infer` loads,
pseudo-labels, Mask R-CNN fine-tuning, and a run killed with SIGKILL that resumes from its checkpoint."""

import json
import subprocess
import sys
import time
import tomllib
from pathlib import Path

import pytest
import torch
from typer.testing import CliRunner

from pipeline.cli import app
from pipeline.errors import SegpipeError
from pipeline.evaluate.pq import evaluate_pq
from pipeline.models import ModelSettings, load_model
from pipeline.train import TrainConfig, run


@pytest.fixture(scope="module")
def cluster():
    import ray

    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False)
    yield
    ray.shutdown()


@pytest.fixture(scope="module")
def trained(cluster, dataset, tmp_path_factory):
    """A short 2-worker run on the 12-image split (validated on it too)."""
    out = tmp_path_factory.mktemp("train") / "run"
    panoptic = str(dataset / "annotations" / "panoptic_val.json")
    result = run(TrainConfig(train=panoptic, val=panoptic, model="segpipe_small", out=str(out), workers=2, steps=6,
                             batch_size=4, checkpoint_every=3, learning_rate=2e-3, warmup=2))
    return out, result


def test_two_workers_train_and_write_a_checkpoint_with_its_metadata(trained, dataset):
    out, result = trained
    assert [point["step"] for point in result.history] == [3, 6]
    checkpoint = torch.load(out / "model.pt", map_location="cpu", weights_only=True)
    assert checkpoint["model_name"] == "segpipe_small" and checkpoint["step"] == checkpoint["steps"] == 6
    assert [c["id"] for c in checkpoint["categories"]] == [
        c["id"] for c in json.loads((dataset / "annotations" / "panoptic_val.json").read_text())["categories"]]
    identity = json.loads((out / "train.json").read_text())
    assert checkpoint["data"] == {"train": identity["train"]["fingerprint"], "val": identity["val"]["fingerprint"]}
    project = tomllib.loads((Path(__file__).parents[1] / "pyproject.toml").read_text())["project"]
    assert checkpoint["code_version"] == project["version"] and checkpoint["val"] == result.history[-1]
    assert {"pq", "pq_things", "pq_stuff", "ap"} <= checkpoint["val"].keys()
    assert json.loads((out / "metrics.json").read_text())["history"] == result.history
    # Ray Train keeps the last two checkpoints, each a folder with the weights and the optimiser state.
    kept = sorted(p for p in (out / "checkpoints").iterdir() if p.is_dir() and p.name.startswith("checkpoint_"))
    assert len(kept) == 2 and all({"model.pt", "state.pt"} <= {f.name for f in p.iterdir()} for p in kept)


def test_the_checkpoint_labels_with_segpipe_infer_and_scores_what_validation_said(trained, dataset, tmp_path):
    """`segpipe infer --weights` with no threshold given takes the ones the checkpoint was validated with
    (a stuff area of 64 pixels where infer's own default is 4,096)."""
    out, result = trained
    labels = tmp_path / "labels"
    done = CliRunner().invoke(app, ["infer", "--input", str(dataset / "val"), "--model", "segpipe_small",
                                    "--weights", str(out / "model.pt"), "--out", str(labels)])
    assert done.exit_code == 0, done.output
    settings = json.loads((labels / "run.json").read_text())["settings"]
    assert (settings["fusion"]["stuff_area_threshold"], settings["score_threshold"]) == (64, 0.05)
    pq = evaluate_pq(str(dataset / "annotations" / "panoptic_val.json"), str(labels / "panoptic_pred.json"))
    # The same model and evaluation; convolutions over other batch compositions (infer's batches of 4,
    # each validation worker's 6 images) differ in the last bits, which moves a few near-tie pixels of
    # this barely trained model. Bit-equality on the same predictions: test_train_data.py.
    assert pq["All"]["pq"] == pytest.approx(result.history[-1]["pq"], abs=5e-3)
    assert pq["All"]["pq"] > 0.01  # else both sides could be 0 and agree whatever validation computed
    # Validation's AP is `segpipe eval ap` of the same labels' thing segments against the instances file.
    from pipeline.evaluate.ap import evaluate_ap

    ap = evaluate_ap(str(dataset / "annotations" / "instances_val.json"), str(labels / "instances_pred_results.json"))
    assert ap["stats"][0] == pytest.approx(result.history[-1]["ap"], abs=5e-3)
    # Those labels are pseudo-labels the next round trains on beside the human ones, half of each batch.
    panoptic = str(dataset / "annotations" / "panoptic_val.json")
    again = run(TrainConfig(train=panoptic, val=panoptic, pseudo=(str(labels),), pseudo_ratio=0.5,
                            model="segpipe_small", out=str(tmp_path / "round2"), init=str(out / "model.pt"),
                            steps=2, batch_size=2, checkpoint_every=2))
    assert [point["step"] for point in again.history] == [2]
    checkpoint = torch.load(tmp_path / "round2" / "model.pt", map_location="cpu", weights_only=True)
    identity = json.loads((tmp_path / "round2" / "train.json").read_text())
    assert checkpoint["data"]["train"] == identity["train"]["fingerprint"]
    assert checkpoint["data"]["pseudo"] == [identity["pseudo"][0]["fingerprint"]] and identity["pseudo_ratio"] == 0.5
    assert identity["pseudo"][0]["images"] == str(dataset / "val")  # the infer run's input
    # Mask R-CNN's losses take whatever no box covers as background: the objects a pseudo-label set leaves out
    # would be taught as background, so it is refused (one line, before anything is written).
    instances = str(dataset / "annotations" / "instances_val.json")
    with pytest.raises(SegpipeError, match="would learn the objects they leave out .* as background"):
        run(TrainConfig(train=instances, val=instances, pseudo=(str(labels),), model="maskrcnn_resnet50_fpn",
                        out=str(tmp_path / "mask-rcnn"), steps=1, batch_size=2))
    assert not (tmp_path / "mask-rcnn").exists()


def test_mask_rcnn_fine_tunes_from_a_users_checkpoint(cluster, dataset, tmp_path):
    """A user's checkpoint (here randomly initialised: nothing may be downloaded) fine-tuned on the things."""
    settings = ModelSettings(random_weights=True, min_size=128, max_size=128)
    start = load_model("maskrcnn_resnet50_fpn", settings).module.state_dict()
    torch.save(start, tmp_path / "user.pt")
    instances = str(dataset / "annotations" / "instances_val.json")
    result = run(TrainConfig(train=instances, val=instances, model="maskrcnn_resnet50_fpn", out=str(tmp_path / "out"),
                             init=str(tmp_path / "user.pt"), steps=1, batch_size=2, checkpoint_every=1,
                             settings=ModelSettings(min_size=128, max_size=128)))
    assert [point["step"] for point in result.history] == [1] and "ap" in result.history[0]
    tuned = load_model("maskrcnn_resnet50_fpn", ModelSettings(weights=result.model)).module.state_dict()
    changed = [k for k in start if not torch.equal(start[k], tuned[k])]
    assert changed and not any("bn" in k for k in changed)  # trained, with batch norm frozen


def test_a_run_killed_midway_resumes_from_its_last_checkpoint(dataset, tmp_path, kill_session):
    """SIGKILL to every process of the run's session (driver, Ray's daemons, the workers), then --resume."""
    panoptic = str(dataset / "annotations" / "panoptic_val.json")
    out = tmp_path / "run"
    command = [sys.executable, "-m", "pipeline", "train", "--train", panoptic, "--val", panoptic, "--model",
               "segpipe_small", "--out", str(out), "--steps", "40", "--batch-size", "2", "--checkpoint-every", "4"]
    process = subprocess.Popen(command, start_new_session=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.monotonic() + 240
    snapshot = out / "checkpoints" / "checkpoint_manager_snapshot.json"  # Ray Train's record of its checkpoints

    def latest() -> int:
        try:
            return json.loads(snapshot.read_text())["latest_checkpoint_result"]["metrics"]["step"]
        except (FileNotFoundError, json.JSONDecodeError, TypeError):
            return 0
    while time.monotonic() < deadline and process.poll() is None and latest() < 8:
        time.sleep(0.2)
    assert process.poll() is None, "the run ended before it could be killed"
    assert kill_session(process.pid) >= 4  # the driver, GCS, raylet, controller, training worker, ...
    process.wait()
    assert not (out / "model.pt").exists()
    saved = latest()
    assert 8 <= saved < 40
    resumed = subprocess.run([*command, "--resume"], capture_output=True, text=True, timeout=300)
    assert resumed.returncode == 0, resumed.stderr[-2000:]
    assert f"resumed at step {saved} of 40" in resumed.stdout + resumed.stderr
    history = json.loads((out / "metrics.json").read_text())["history"]
    assert [point["step"] for point in history] == list(range(4, 44, 4))  # before the kill and after, once each
    assert torch.load(out / "model.pt", weights_only=True)["step"] == 40


def test_data_and_checkpoints_on_s3(s3_bucket, dataset):
    """Labels, images and Ray Train's checkpoints all on a real S3 API (moto's server on loopback); a run
    in its own process, so its Ray workers start with the endpoint in their environment, as a user's would."""
    import fsspec

    from pipeline.synth import SynthConfig, write_dataset

    root = f"s3://{s3_bucket}/data"
    write_dataset(root, SynthConfig(images=6, split="val", seed=7))
    panoptic = f"{root}/annotations/panoptic_val.json"
    out = f"s3://{s3_bucket}/runs/one"
    done = subprocess.run([sys.executable, "-m", "pipeline", "train", "--train", panoptic, "--val", panoptic,
                           "--model", "segpipe_small", "--out", out, "--steps", "2", "--batch-size", "2",
                           "--checkpoint-every", "1"], capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    fs = fsspec.filesystem("s3", skip_instance_cache=True)
    kept = sorted(p for p in fs.ls(f"{s3_bucket}/runs/one/checkpoints") if "/checkpoint_2" in p)
    assert len(kept) == 2 and all(fs.exists(f"{p}/state.pt") for p in kept)
    model = load_model("segpipe_small", ModelSettings(weights=f"{out}/model.pt"))  # straight from S3, as infer does
    assert [c["id"] for c in model.categories] == [c["id"] for c in json.loads(
        fs.cat_file(f"{s3_bucket}/data/annotations/panoptic_val.json"))["categories"]]
    assert [p["step"] for p in json.loads(fs.cat_file(f"{s3_bucket}/runs/one/metrics.json"))["history"]] == [1, 2]


def test_an_image_that_breaks_mid_training_is_one_line_naming_it(dataset, tmp_path):
    """A user error inside a Ray Train worker reaches the terminal as one line, without the worker's traceback."""
    import shutil

    root = tmp_path / "data"
    shutil.copytree(dataset / "val", root / "val")
    shutil.copytree(dataset / "annotations", root / "annotations")
    broken = sorted((root / "val").iterdir())[2]
    broken.write_bytes(broken.read_bytes()[:500])
    panoptic = str(root / "annotations" / "panoptic_val.json")
    done = subprocess.run([sys.executable, "-m", "pipeline", "train", "--train", panoptic, "--val", panoptic,
                           "--model", "segpipe_small", "--out", str(tmp_path / "out"), "--steps", "4",
                           "--batch-size", "4"], capture_output=True, text=True, timeout=300)
    assert done.returncode == 2
    assert done.stderr.strip().splitlines()[-1].endswith(f"({broken.name}): truncated")
    # Not the worker's traceback (Ray's own threads may still print theirs while the cluster shuts down).
    output = done.stdout + done.stderr
    assert output.count("SegpipeError") == 0 and "pipeline/train/" not in output
