"""Job specs: checked against their schemas with errors naming the key and the line; `segpipe run` runs them."""

import json
from pathlib import Path

import pytest
import yaml
from typer.testing import CliRunner

from pipeline.cli import app
from pipeline.jobs import KINDS, load

runner = CliRunner()
JOBS = Path(__file__).parent.parent / "jobs"


def test_every_example_spec_is_a_valid_job_of_its_kind():
    found = {path.stem: load(str(path)) for path in JOBS.glob("*.yaml")}
    assert sorted(found) == sorted(KINDS)
    assert all(job.kind == name for name, job in found.items())
    label = found["label"].spec
    assert label["infer"]["batch_size"] == 4 and label["infer"]["name"] == "pred"  # given, and a default filled in
    assert label["schedule"] == {"cron": "*/15 * * * *", "lease_seconds": 900}
    assert label["input"] == str((JOBS.parent / "data" / "incoming").resolve())  # relative to the spec's folder
    assert found["report"].spec["leakage_with"] == [] and found["eval"].spec["iou_type"] == "segm"


def test_the_digest_is_the_work_not_the_spelling(tmp_path):
    one, two = tmp_path / "one.yaml", tmp_path / "two.yaml"
    one.write_text("kind: eval\nmetric: pq\ngt: gt.json\npred: pred.json\nout: r.json\n")
    two.write_text("# the same work\nout: r.json\npred: pred.json\ngt: gt.json\nmetric: pq\nkind: eval\nworkers: 1\n")
    assert load(str(one)).digest == load(str(two)).digest
    two.write_text(two.read_text().replace("workers: 1", "workers: 2"))
    assert load(str(one)).digest != load(str(two)).digest


@pytest.mark.parametrize("text, message", [
    ("kind: label\ninput: in\nout: o\nmodel: segpipe_small\ninfer:\n  batch_size: 4\n  batsh_size: 4\n",
     ":7: unknown key 'infer.batsh_size'; known: batch_size,"),
    ("kind: label\ninput: in\nout: o\nmodel: segpipe_small\ninfer:\n  batch_size: four\n",
     ":6: infer.batch_size: 'four' is not of type 'integer'"),
    ("kind: eval\nmetric: pq\ngt: g\npred: p\nout: o\nworkrs: 2\n", ":6: unknown key 'workrs'"),
    ("kind: eval\nmetric: dice\ngt: g\npred: p\nout: o\n", ":2: metric: 'dice' is not one of ['pq', 'ap', 'miou']"),
    ("kind: report\nout: o\n", "'dataset' is a required property"),
    ("kind: label\ninput: in\nout: o\nmodel: m\nschedule: {lease_seconds: 5}\n", ":5: 'cron' is a required property in schedule"),
    ("kind: labels\n", "kind: 'labels'; one of label, eval, engine, report"),
    ("input: in\n", "kind: missing; one of label, eval, engine, report"),
    ("kind: [label\n", "not YAML"),
])
def test_a_bad_spec_is_one_line_naming_the_key_and_the_line(tmp_path, text, message):
    spec = tmp_path / "job.yaml"
    spec.write_text(text)
    result = runner.invoke(app, ["run", str(spec)])
    assert result.exit_code == 2 and message in result.stderr and result.stderr.count("\n") == 1, result.output
    assert result.stderr.startswith(f"segpipe: error: {spec}")


def test_missing_inputs_are_one_line_before_any_work(dataset, tmp_path):
    spec = tmp_path / "job.yaml"
    spec.write_text(f"kind: label\ninput: {tmp_path / 'nowhere'}\nout: {tmp_path / 'out'}\nmodel: segpipe_small\n"
                    "random_weights: true\n")
    result = runner.invoke(app, ["run", str(spec)])
    assert result.exit_code == 2 and "input: " in result.stderr and "nowhere: no such file or folder" in result.stderr
    spec.write_text(f"kind: label\ninput: {dataset / 'val'}\nout: {tmp_path / 'out'}\nmodel: segpipe_small\n")
    result = runner.invoke(app, ["run", str(spec)])
    assert result.exit_code == 2 and "weights: give the model's checkpoint" in result.stderr
    spec.write_text(f"kind: label\ninput: {dataset / 'val'}\nout: {tmp_path / 'out'}\nmodel: segpipe_smal\n"
                    "random_weights: true\n")
    result = runner.invoke(app, ["run", str(spec)])
    assert result.exit_code == 2 and "segpipe_smal" in result.stderr and result.stderr.count("\n") == 1, result.output
    assert not (tmp_path / "out").exists()


def test_an_eval_job_writes_what_segpipe_eval_writes(dataset, tmp_path):
    gt = dataset / "annotations" / "panoptic_val.json"
    pred = json.loads(gt.read_text())
    things = [c["id"] for c in pred["categories"] if c["isthing"]]
    for annotation in pred["annotations"][:3]:  # a wrong class on three images: PQ below 1
        segment = next(s for s in annotation["segments_info"] if s["category_id"] in things)
        segment["category_id"] = next(c for c in things if c != segment["category_id"])
    (tmp_path / "pred.json").write_text(json.dumps(pred))
    spec = tmp_path / "eval.yaml"
    spec.write_text(yaml.safe_dump({"kind": "eval", "metric": "pq", "gt": str(gt), "pred": "pred.json",
                                    "pred_dir": str(dataset / "annotations" / "panoptic_val"), "out": "pq.json"}))
    result = runner.invoke(app, ["run", str(spec)])
    assert result.exit_code == 0, result.output
    direct = runner.invoke(app, ["eval", "pq", "--gt", str(gt), "--pred", str(tmp_path / "pred.json"), "--pred-dir",
                                 str(dataset / "annotations" / "panoptic_val"), "--out", str(tmp_path / "direct.json")])
    assert direct.exit_code == 0, direct.output
    written = json.loads((tmp_path / "pq.json").read_text())
    assert written == json.loads((tmp_path / "direct.json").read_text()) and 0 < written["All"]["pq"] < 1


def test_a_label_job_labels_its_input(dataset, tmp_path):
    spec = tmp_path / "label.yaml"
    spec.write_text(yaml.safe_dump({
        "kind": "label", "input": str(dataset / "val"), "out": "labels", "model": "segpipe_small",
        "random_weights": True, "categories": str(dataset / "annotations" / "panoptic_val.json"),
        "infer": {"files_per_shard": 5, "stuff_area": 0}}))
    result = runner.invoke(app, ["run", str(spec)])
    assert result.exit_code == 0, result.output
    import pyarrow.parquet as pq

    table = pq.read_table(sorted((tmp_path / "labels").glob("batches/*/predictions/*.parquet")))  # a tick's batch
    assert sorted(set(table.column("file_name").to_pylist())) == sorted(p.name for p in (dataset / "val").iterdir())
