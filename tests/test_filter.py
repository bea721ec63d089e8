"""`segpipe filter`: the decisions table rule by rule, per-class overrides, duplicates, and the kept set as training data."""

import json
from dataclasses import replace

import numpy as np
import pyarrow.parquet as pq
import pytest
from typer.testing import CliRunner

from pipeline.cli import app
from pipeline.io.tables import write_predictions
from pipeline.structures import ImagePrediction, Segment

runner = CliRunner()
SIZE = 20


def _mask(y0, y1, x0, x1):
    mask = np.zeros((SIZE, SIZE), bool)
    mask[y0:y1, x0:x1] = True
    return mask


def _segment(id, category, mask, score, stability=0.99, flip=0.9):
    return replace(Segment.from_mask(id, category, mask, score, stability=stability), flip_iou=flip)


@pytest.fixture
def labelled(tmp_path):
    """An infer output folder: image 1 has one candidate per rule (each failing only that rule), image 2 two
    overlapping instances and a third beside them; a second part holds image 3."""
    out = tmp_path / "infer"
    (out / "predictions").mkdir(parents=True)
    (out / "run.json").write_text(json.dumps({"input": str(tmp_path / "images"), "run_id": "r1", "model": "m"}))
    categories = [{"id": 7, "name": "a", "isthing": 1}, {"id": 8, "name": "b", "isthing": 1}]
    (out / "categories.json").write_text(json.dumps(categories))
    one = ImagePrediction(1, "1.jpg", SIZE, SIZE, (
        _segment(1, 7, _mask(0, 5, 0, 5), 0.9),  # kept
        _segment(2, 7, _mask(5, 9, 0, 5), 0.2),  # score
        _segment(3, 8, _mask(0, 5, 5, 9), 0.9, stability=0.5),  # stability
        _segment(4, 7, _mask(5, 9, 5, 9), 0.9, flip=0.1),  # flip agreement
        _segment(5, 7, _mask(10, 11, 10, 11), 0.9),  # 1 pixel: min area
        _segment(6, 7, _mask(12, 20, 0, 20), 0.9),  # 160 pixels: max area
        _segment(7, 8, _mask(10, 12, 12, 14), 0.3),  # score 0.3 < 0.5, but class 8 keeps from 0.25
    ))
    two = ImagePrediction(2, "2.jpg", SIZE, SIZE, (
        _segment(1, 7, _mask(0, 10, 0, 10), 0.6),  # IoU 90/100 with segment 2: its duplicate (lower score)
        _segment(2, 8, _mask(0, 10, 0, 9), 0.8),
        _segment(3, 7, _mask(0, 10, 5, 15), 0.7),  # IoU 40/140 with segment 2: kept
        _segment(4, 7, _mask(0, 10, 0, 10), 0.95, stability=0.1),  # rejected before duplicates: suppresses none
    ))
    three = ImagePrediction(3, "3.jpg", SIZE, SIZE, (_segment(1, 7, _mask(0, 4, 0, 4), 0.9, stability=None, flip=None),))
    write_predictions(str(out / "predictions" / "part-00000.parquet"), [one, two], "r1", "m")
    write_predictions(str(out / "predictions" / "part-00001.parquet"), [three], "r1", "m")
    return out


def _filter(labelled, out, *options):
    result = runner.invoke(app, ["filter", "--pred", str(labelled), "--out", str(out), "--min-score", "0.5",
                                 "--min-stability", "0.9", "--min-flip-iou", "0.5", "--min-area", "2",
                                 "--max-area", "150", *options])
    return result


def test_each_candidate_is_kept_or_rejected_by_the_first_rule_it_fails(labelled, tmp_path):
    out = tmp_path / "filtered"
    result = _filter(labelled, out, "--class-rules", '{"8": {"min_score": 0.25, "min_stability": 0.9}}')
    assert result.exit_code == 0, result.output
    decisions = pq.read_table(out / "decisions").to_pylist()
    verdicts = {(d["image_id"], d["segment_id"]): (d["kept"], d["rejected_by"], d["duplicate_of"]) for d in decisions}
    assert verdicts == {
        (1, 1): (True, None, None), (1, 2): (False, "min_score", None), (1, 3): (False, "min_stability", None),
        (1, 4): (False, "min_flip_iou", None), (1, 5): (False, "min_area", None), (1, 6): (False, "max_area", None),
        (1, 7): (True, None, None),  # class 8's own rules: no flip or area rule, score 0.25
        (2, 1): (False, "duplicate", 2), (2, 2): (True, None, None), (2, 3): (True, None, None),
        (2, 4): (False, "min_stability", None),
        (3, 1): (False, "min_stability", None),  # no stability recorded: a rule that needs it rejects
    }
    row = next(d for d in decisions if (d["image_id"], d["segment_id"]) == (1, 3))
    assert (row["category_id"], row["score"], row["stability"], row["flip_iou"], row["area"]) == (8, 0.9, 0.5, 0.9, 20)
    summary = json.loads((out / "filter.json").read_text())
    assert (summary["candidates"], summary["kept"]) == (12, 4)
    assert summary["rejected"] == {"min_score": 1, "min_stability": 3, "min_flip_iou": 1, "min_class_agreement": 0,
                                   "min_area": 1, "max_area": 1, "duplicate": 1}
    assert summary["rules"]["per_class"]["8"]["min_score"] == 0.25
    assert "4 of 12 segments kept" in result.output
    # The kept segments, as a predictions table with every column of the source's rows.
    kept = pq.read_table(out / "predictions")
    assert sorted(zip(kept.column("image_id").to_pylist(), kept.column("segment_id").to_pylist())) == [
        (1, 1), (1, 7), (2, 2), (2, 3)]
    assert kept.column("stability").to_pylist() == [0.99] * 4


def test_the_kept_segments_are_a_dataset_segpipe_train_reads(labelled, tmp_path):
    from pipeline.train.data import load_dataset

    out = tmp_path / "filtered"
    assert _filter(labelled, out).exit_code == 0
    dataset = load_dataset(str(out))
    assert dataset.images == str(tmp_path / "images") and [c["id"] for c in dataset.categories] == [7, 8]
    assert {e.image_id: [s["id"] for s in e.segments] for e in dataset.examples} == {1: [1], 2: [2, 3]}


def test_duplicates_off_and_bad_rules_are_one_line(labelled, tmp_path):
    out = tmp_path / "all"
    assert runner.invoke(app, ["filter", "--pred", str(labelled), "--out", str(out), "--duplicate-iou", "1"]).exit_code == 0
    assert all(d["kept"] for d in pq.read_table(out / "decisions").to_pylist())  # no rule given: everything kept
    for options, message in (
        (["--class-rules", "{"], "--class-rules: not JSON"),
        (["--class-rules", '{"x": {}}'], "'x' is not a category id"),
        (["--class-rules", '{"7": {"min_scor": 1}}'], "unknown rule 'min_scor'"),
        (["--class-rules", '{"7": {"min_score": "high"}}'], "min_score must be a number"),
    ):
        result = runner.invoke(app, ["filter", "--pred", str(labelled), "--out", str(tmp_path / "x"), *options])
        assert result.exit_code == 2 and message in result.stderr and result.stderr.count("\n") == 1, result.output
    result = runner.invoke(app, ["filter", "--pred", str(tmp_path), "--out", str(tmp_path / "x")])
    assert result.exit_code == 2 and "not a `segpipe infer` output folder" in result.stderr
    again = runner.invoke(app, ["filter", "--pred", str(labelled), "--out", str(out), "--duplicate-iou", "1"])
    assert again.exit_code == 0, again.output  # the same run again: the same outputs
    other = runner.invoke(app, ["filter", "--pred", str(labelled), "--out", str(out), "--min-score", "0.5"])
    assert other.exit_code == 2 and "holds the decisions of other predictions or rules" in other.stderr


def test_flip_rule_on_predictions_without_flip_agreement_is_one_line(labelled, tmp_path):
    from pipeline.io.tables import read_predictions

    for part in sorted((labelled / "predictions").iterdir()):
        predictions = read_predictions([str(part)])
        write_predictions(str(part), [replace(p, segments=tuple(replace(s, flip_iou=None) for s in p.segments))
                                      for p in predictions], "r1", "m")
    result = _filter(labelled, tmp_path / "x")
    assert result.exit_code == 2 and "no flip agreement" in result.stderr and "--flip-check" in result.stderr


def _instances_json(path, images):
    """COCO instances labels: {image_id: [(category, mask), ...]} as RLE annotations."""
    from pycocotools import mask as mask_utils

    annotations = []
    for image_id, objects in images.items():
        for category, mask in objects:
            rle = mask_utils.encode(np.asfortranarray(mask.astype(np.uint8)))
            annotations.append({"id": len(annotations) + 1, "image_id": image_id, "category_id": category, "iscrowd": 0,
                                "segmentation": {"size": [SIZE, SIZE], "counts": rle["counts"].decode()},
                                "area": int(mask.sum()), "bbox": [0, 0, 1, 1]})
    path.write_text(json.dumps({"images": [{"id": i, "file_name": f"{i}.jpg", "height": SIZE, "width": SIZE}
                                           for i in images], "annotations": annotations,
                                "categories": [{"id": 7, "name": "a"}, {"id": 8, "name": "b"}]}))
    return path


def test_an_audit_set_measures_each_rule_and_the_kept_set(labelled, tmp_path):
    audit = _instances_json(tmp_path / "audit.json", {
        1: [(7, _mask(0, 5, 0, 5)), (8, _mask(0, 5, 5, 9)), (7, _mask(5, 9, 5, 9))],
        2: [(8, _mask(0, 10, 0, 9)), (7, _mask(0, 10, 10, 20))]})  # image 3 is not audited
    out = tmp_path / "filtered"
    result = _filter(labelled, out, "--class-rules", '{"8": {"min_score": 0.25, "min_stability": 0.9}}',
                     "--audit", str(audit))
    assert result.exit_code == 0, result.output
    report = json.loads((out / "filter.json").read_text())["audit"]
    # 11 candidates on images 1 and 2, 4 of them match a label (1/1, 1/3, 1/4, 2/2); 5 labelled segments.
    assert (report["images"], report["candidates"], report["labelled_segments"]) == (2, 11, 5)
    assert report["kept"] == {"candidates": 4, "precision": 0.5, "recall": 0.4, "pq": None}  # instances: no PQ
    assert report["per_rule"]["min_score"] == {"candidates": 10, "precision": 0.4, "recall": 0.8}
    assert report["per_rule"]["min_stability"]["candidates"] == 9  # 1/3 and 2/4 fail it
    # Alone, duplicate suppression keeps 2/4 (score 0.95, though unstable), which suppresses 2/2 and 2/1.
    assert report["per_rule"]["duplicate"] == {"candidates": 9, "precision": 3 / 9, "recall": 0.6}
    assert "audit: kept precision 0.50, recall 0.40" in result.output


def test_a_panoptic_audit_gives_the_pseudo_labels_pq(tmp_path):
    from pipeline.structures import encode_panoptic_png

    out = tmp_path / "infer"
    (out / "predictions").mkdir(parents=True)
    (out / "run.json").write_text(json.dumps({"input": str(tmp_path), "run_id": "r", "model": "m"}))
    (out / "categories.json").write_text(json.dumps([{"id": 7, "name": "a", "isthing": 1},
                                                     {"id": 8, "name": "b", "isthing": 0}]))
    a, b, c = _mask(0, 10, 0, 10), _mask(10, 20, 0, 10), _mask(0, 20, 10, 20)
    write_predictions(str(out / "predictions" / "part-00000.parquet"), [ImagePrediction(1, "1.jpg", SIZE, SIZE, (
        _segment(1, 7, a, 0.9), _segment(2, 8, b, 0.2)))], "r", "m")
    ids = np.zeros((SIZE, SIZE), np.uint32)
    ids[a], ids[c] = 5, 6
    (tmp_path / "panoptic").mkdir()
    (tmp_path / "panoptic" / "1.png").write_bytes(encode_panoptic_png(ids))
    (tmp_path / "panoptic.json").write_text(json.dumps({
        "images": [{"id": 1, "file_name": "1.jpg", "height": SIZE, "width": SIZE}],
        "annotations": [{"image_id": 1, "file_name": "1.png", "segments_info": [
            {"id": 5, "category_id": 7, "iscrowd": 0}, {"id": 6, "category_id": 8, "iscrowd": 0}]}],
        "categories": [{"id": 7, "name": "a", "isthing": 1}, {"id": 8, "name": "b", "isthing": 0}]}))
    result = runner.invoke(app, ["filter", "--pred", str(out), "--out", str(tmp_path / "f"), "--min-score", "0.5",
                                 "--audit", str(tmp_path / "panoptic.json")])
    assert result.exit_code == 0, result.output
    report = json.loads((tmp_path / "f" / "filter.json").read_text())["audit"]
    # Kept: segment 1, exactly label 5 (class a: PQ 1); label 6 of class b is missed (PQ 0): mean 0.5.
    assert report["kept"] == {"candidates": 1, "precision": 1.0, "recall": 0.5, "pq": 0.5}


def test_a_target_precision_chooses_each_class_threshold_from_the_audit(labelled, tmp_path):
    audit = _instances_json(tmp_path / "audit.json", {
        1: [(7, _mask(0, 5, 0, 5)), (8, _mask(0, 5, 5, 9)), (7, _mask(5, 9, 5, 9))],
        2: [(8, _mask(0, 10, 0, 9)), (7, _mask(0, 10, 10, 20))]})
    result = runner.invoke(app, ["filter", "--pred", str(labelled), "--out", str(tmp_path / "a"), "--min-stability",
                                 "0.9", "--min-flip-iou", "0.5", "--min-area", "2", "--max-area", "150",
                                 "--audit", str(audit), "--target-precision", "0.5"])
    assert result.exit_code == 0, result.output
    tuned = json.loads((tmp_path / "a" / "filter.json").read_text())["tuned"]["per_class"]
    # Class 7, audited candidates passing the other rules, by score: 0.9 right, 0.7, 0.6, 0.2 wrong: 0.7 is the
    # loosest with precision 1/2. Class 8: 0.8 right, 0.3 wrong: 0.3 (1/2).
    assert tuned == {"7": {"threshold": 0.7, "precision": 0.5, "candidates": 2, "audited": 4},
                     "8": {"threshold": 0.3, "precision": 0.5, "candidates": 2, "audited": 2}}
    assert "class 7: min_score 0.7 (audit precision 0.50 on 2 of 4 candidates)" in result.output
    decisions = {(d["image_id"], d["segment_id"]): d["rejected_by"] for d in pq.read_table(tmp_path / "a" / "decisions").to_pylist()}
    assert decisions[(2, 1)] == "min_score" and decisions[(2, 3)] is None  # 0.6 < 0.7 <= 0.7
    # On stability, class 7 never reaches 1/2 (0.99: 1 of 3 right): its threshold lies above all its candidates.
    result = runner.invoke(app, ["filter", "--pred", str(labelled), "--out", str(tmp_path / "b"), "--min-score", "0.5",
                                 "--audit", str(audit), "--target-precision", "0.5", "--tune", "min_stability"])
    assert result.exit_code == 0, result.output
    chosen = json.loads((tmp_path / "b" / "filter.json").read_text())["tuned"]["per_class"]["7"]
    assert chosen["threshold"] > 0.99 and (chosen["precision"], chosen["candidates"]) == (None, 0)
    kept = pq.read_table(tmp_path / "b" / "predictions")
    assert 7 not in kept.column("category_id").to_pylist()
    result = runner.invoke(app, ["filter", "--pred", str(labelled), "--out", str(tmp_path / "c"), "--target-precision", "0.5"])
    assert result.exit_code == 2 and "needs --audit" in result.stderr


@pytest.fixture
def classified(tmp_path):
    """A `segpipe classify` output: proposals of classes 7 and 8 with their class agreement."""
    out = tmp_path / "classified"
    (out / "predictions").mkdir(parents=True)
    (out / "run.json").write_text(json.dumps({"input": str(tmp_path / "images"), "run_id": "r2", "model": "sam"}))
    (out / "categories.json").write_text(json.dumps([{"id": 7, "name": "a", "isthing": 1}, {"id": 8, "name": "b", "isthing": 1}]))
    segments = [replace(_segment(k + 1, category, _mask(0, 2, 4 * k, 4 * k + 2), 0.9), class_agreement=agreement)
                for k, (category, agreement) in enumerate([(7, 0.9), (7, 0.6), (8, 0.6), (8, 0.3)])]
    write_predictions(str(out / "predictions" / "part-00000.parquet"),
                      [ImagePrediction(1, "1.jpg", SIZE, SIZE, tuple(segments))], "r2", "sam")
    return out


def test_min_class_agreement_rejects_proposals_the_panoptic_model_disagrees_with(classified, tmp_path):
    out = tmp_path / "filtered"
    result = runner.invoke(app, ["filter", "--pred", str(classified), "--out", str(out), "--min-class-agreement", "0.75",
                                 "--class-rules", '{"8": {"min_class_agreement": 0.5}}'])
    assert result.exit_code == 0, result.output
    decisions = pq.read_table(out / "decisions").to_pylist()
    assert [(d["segment_id"], d["class_agreement"], d["kept"], d["rejected_by"]) for d in decisions] == [
        (1, 0.9, True, None), (2, 0.6, False, "min_class_agreement"),  # class 7: at least 0.75
        (3, 0.6, True, None), (4, 0.3, False, "min_class_agreement")]  # class 8: its own 0.5
    summary = json.loads((out / "filter.json").read_text())
    assert summary["rejected"]["min_class_agreement"] == 2 and summary["rules"]["thresholds"]["min_class_agreement"] == 0.75
    assert pq.read_table(out / "predictions").column("class_agreement").to_pylist() == [0.9, 0.6]
    assert pq.read_schema(out / "decisions" / "part-00000.parquet").metadata[b"segpipe.version"] == b"2"


def test_min_class_agreement_on_predictions_without_classes_is_one_line(labelled, tmp_path):
    result = runner.invoke(app, ["filter", "--pred", str(labelled), "--out", str(tmp_path / "x"), "--min-class-agreement", "0.5"])
    assert result.exit_code == 2 and result.stderr.count("\n") == 1, result.output
    assert "no class agreement to apply --min-class-agreement to; give proposals a class with `segpipe classify`" in result.stderr


def test_a_target_precision_can_choose_the_class_agreement_threshold(classified, tmp_path):
    labels = _instances_json(tmp_path / "labels.json", {1: [(7, _mask(0, 2, 0, 2)), (8, _mask(0, 2, 8, 10))]})
    out = tmp_path / "tuned"
    result = runner.invoke(app, ["filter", "--pred", str(classified), "--out", str(out), "--audit", str(labels),
                                 "--target-precision", "1", "--tune", "min_class_agreement"])
    assert result.exit_code == 0, result.output
    chosen = json.loads((out / "filter.json").read_text())["tuned"]["per_class"]
    # class 7: only the 0.9 proposal is right; class 8: the 0.6 one is right, the 0.3 one is not
    assert {k: (v["threshold"], v["precision"], v["candidates"]) for k, v in chosen.items()} == {
        "7": (0.9, 1.0, 1), "8": (0.6, 1.0, 1)}
