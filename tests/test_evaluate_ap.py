"""AP: equal to pycocotools' COCOeval on hard data, segm and bbox; Parquet input; workers; errors."""

import contextlib
import io
import json

import numpy as np
import pytest
from pycocotools.coco import COCO
from pycocotools.cocoeval import COCOeval
from typer.testing import CliRunner

from pipeline.cli import app
from pipeline.evaluate.ap import STAT_NAMES, evaluate_ap
from pipeline.io.tables import write_predictions
from pipeline.structures import ImagePrediction, Rle, Segment
from pipeline.synth import SynthConfig, perturb_instances, write_dataset


@pytest.fixture(scope="module")
def gt_path(tmp_path_factory):
    """40 images: crowds, objects from a few pixels to a third of the image, occlusion."""
    root = tmp_path_factory.mktemp("ap")
    write_dataset(str(root), SynthConfig(images=40, split="val", seed=21, crowd_probability=0.5))
    return root / "annotations" / "instances_val.json"


@pytest.fixture(scope="module")
def results_path(gt_path):
    """Shifted, missed, mislabelled and spurious detections; scores on a 0.1 grid (many exact ties);
    120 detections on two images (past maxDets=100)."""
    results = perturb_instances(json.loads(gt_path.read_text()), np.random.default_rng(5))
    path = gt_path.parent / "results.json"
    path.write_text(json.dumps(results))
    return path


def _pycocotools(gt_path, results, iou_type):
    with contextlib.redirect_stdout(io.StringIO()):
        gt = COCO(str(gt_path))
        evaluator = COCOeval(gt, gt.loadRes(results), iou_type)
        evaluator.evaluate()
        evaluator.accumulate()
        evaluator.summarize()
    return evaluator


@pytest.mark.parametrize("iou_type", ["segm", "bbox"])
def test_all_twelve_stats_and_per_class_ap_equal_pycocotools(gt_path, results_path, iou_type):
    results = json.loads(results_path.read_text())
    scores = [r["score"] for r in results]
    assert len(scores) - len(set(scores)) > 100  # ties are everywhere
    per_image = np.bincount([r["image_id"] for r in results])
    assert per_image.max() > 100
    ours = evaluate_ap(str(gt_path), str(results_path), iou_type)
    reference = _pycocotools(gt_path, str(results_path), iou_type)
    assert 0.05 < reference.stats[0] < 0.9
    np.testing.assert_allclose(ours["stats"], reference.stats, rtol=0, atol=1e-9)
    assert [ours[name] for name in STAT_NAMES] == ours["stats"]
    precision = reference.eval["precision"]
    for k, category_id in enumerate(reference.params.catIds):
        p = precision[:, :, k, 0, 2]
        expected = float(np.mean(p[p > -1])) if (p > -1).any() else -1.0
        assert ours["per_class"][str(category_id)]["AP"] == pytest.approx(expected, abs=1e-9)


def test_results_without_boxes_take_the_mask_area_as_pycocotools_does(gt_path, results_path, tmp_path):
    results = [{k: v for k, v in r.items() if k != "bbox"} for r in json.loads(results_path.read_text())]
    path = tmp_path / "masks_only.json"
    path.write_text(json.dumps(results))
    for iou_type in ("segm", "bbox"):
        ours = evaluate_ap(str(gt_path), str(path), iou_type)
        np.testing.assert_allclose(ours["stats"], _pycocotools(gt_path, str(path), iou_type).stats, rtol=0, atol=1e-9)


def test_ground_truth_id_zero_reads_as_unmatched_as_in_pycocotools(gt_path, results_path, tmp_path):
    gt = json.loads(gt_path.read_text())
    gt["annotations"][0]["id"], gt["annotations"][-1]["id"] = 0, gt["annotations"][0]["id"]
    path = tmp_path / "gt_id0.json"
    path.write_text(json.dumps(gt))
    ours = evaluate_ap(str(path), str(results_path), "bbox")
    np.testing.assert_allclose(ours["stats"], _pycocotools(path, str(results_path), "bbox").stats, rtol=0, atol=1e-9)


def test_parquet_predictions_score_as_their_coco_export(gt_path, results_path, tmp_path):
    gt = json.loads(gt_path.read_text())
    sizes = {im["id"]: (im["height"], im["width"]) for im in gt["images"]}
    by_image: dict[int, list[Segment]] = {}
    for r in json.loads(results_path.read_text()):
        rle = Rle.from_coco(r["segmentation"], *sizes[r["image_id"]])
        by_image.setdefault(r["image_id"], []).append(
            Segment.from_rle(len(by_image.get(r["image_id"], [])) + 1, r["category_id"], rle, r["score"]))
    predictions = [ImagePrediction(i, f"{i}.jpg", *sizes[i], tuple(s)) for i, s in sorted(by_image.items())]
    write_predictions(str(tmp_path / "table" / "a.parquet"), predictions[:15], "run", "model")
    write_predictions(str(tmp_path / "table" / "b.parquet"), predictions[15:], "run", "model")
    export = tmp_path / "export.json"
    export.write_text(json.dumps([r for p in predictions for r in p.to_coco_results()]))
    for iou_type in ("segm", "bbox"):
        from_table = evaluate_ap(str(gt_path), str(tmp_path / "table"), iou_type, shard_size=7)
        reference = _pycocotools(gt_path, str(export), iou_type)
        np.testing.assert_allclose(from_table["stats"], reference.stats, rtol=0, atol=1e-9)


def test_workers_give_byte_identical_results(gt_path, results_path, tmp_path):
    runner = CliRunner()
    outputs = []
    for k, options in enumerate((["--workers", "1", "--threads", "1"], ["--workers", "1", "--threads", "3"],
                                 ["--workers", "2"], ["--workers", "4"])):
        out = tmp_path / f"ap{k}.json"
        result = runner.invoke(app, ["eval", "ap", "--gt", str(gt_path), "--pred", str(results_path),
                                     "--iou-type", "bbox", "--out", str(out), *options])
        assert result.exit_code == 0, result.output
        outputs.append(out.read_bytes())
    assert len(set(outputs)) == 1
    assert json.loads(outputs[0])["iou_type"] == "bbox"


def test_bad_inputs_are_one_line_errors(gt_path, results_path, tmp_path):
    runner = CliRunner()
    results = json.loads(results_path.read_text())
    cases = {
        "detection for image 4040, which is not in the ground truth": [*results, {**results[0], "image_id": 4040}],
        "unknown category_id 187": [*results, {**results[0], "category_id": 187}],
        "holds no detections": [],
        "not a COCO results file": {"annotations": []},
        "lacks image_id, category_id or score": [{"image_id": 1, "category_id": 1}],
    }
    for message, content in cases.items():
        path = tmp_path / "bad.json"
        path.write_text(json.dumps(content))
        result = runner.invoke(app, ["eval", "ap", "--gt", str(gt_path), "--pred", str(path)])
        assert result.exit_code == 2 and message in result.stderr and result.stderr.count("\n") == 1, result.output
    result = runner.invoke(app, ["eval", "ap", "--gt", str(gt_path), "--pred", str(results_path), "--iou-type", "keypoints"])
    assert result.exit_code == 2 and "use segm or bbox" in result.stderr


def test_a_ground_truth_table_scores_as_its_json_and_refuses_masks_it_lacks(gt_path, results_path, tmp_path):
    """A dataset table as ground truth (masks straight from its RLE column) gives the JSON's bytes; a
    detection-only annotation in it is one line for segm, and bbox still scores as pycocotools does."""
    from pipeline.convert import convert

    convert(str(gt_path), str(tmp_path / "gt"), row_group_images=6)
    for iou_type in ("segm", "bbox"):
        for threads in (1, 3):  # shards of 9 images, evaluated one at a time or three at once
            assert json.dumps(evaluate_ap(str(tmp_path / "gt"), str(results_path), iou_type, shard_size=9,
                                          threads=threads)) == json.dumps(evaluate_ap(str(gt_path), str(results_path), iou_type))
    gt = json.loads(gt_path.read_text())
    del gt["annotations"][3]["segmentation"]
    boxes_only = tmp_path / "boxes_only.json"
    boxes_only.write_text(json.dumps(gt))
    convert(str(boxes_only), str(tmp_path / "gt-boxes"))
    result = CliRunner().invoke(app, ["eval", "ap", "--gt", str(tmp_path / "gt-boxes"), "--pred", str(results_path)])
    annotation = gt["annotations"][3]
    assert result.exit_code == 2 and result.stderr.count("\n") == 1, result.output
    assert f"image {annotation['image_id']}: annotation {annotation['id']}: no 'segmentation'" in result.stderr
    bbox = evaluate_ap(str(tmp_path / "gt-boxes"), str(results_path), "bbox")
    np.testing.assert_allclose(bbox["stats"], _pycocotools(boxes_only, str(results_path), "bbox").stats, rtol=0, atol=1e-9)
