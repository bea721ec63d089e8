"""PQ: panopticapi's semantics on hand-made cases with known answers, parity on random data, workers."""

import contextlib
import io
import json
import math
import shutil

import numpy as np
import pytest
from typer.testing import CliRunner

from pipeline.cli import app
from pipeline.errors import SegpipeError
from pipeline.evaluate.pq import PQStats, _exact, evaluate_pq, image_stats, summarize
from pipeline.io.tables import write_predictions
from pipeline.structures import ImagePrediction, decode_panoptic_png
from pipeline.synth import write_perturbed_panoptic

CATEGORIES = [{"id": 1, "isthing": 1, "name": "a"}, {"id": 2, "isthing": 1, "name": "b"},
              {"id": 3, "isthing": 0, "name": "s"}]
INDEX = {c["id"]: i for i, c in enumerate(CATEGORIES)}


def _segments(ids: np.ndarray, categories: dict[int, int], crowd: tuple[int, ...] = ()) -> list[dict]:
    return [{"id": sid, "category_id": cat, "iscrowd": int(sid in crowd), "area": int((ids == sid).sum())}
            for sid, cat in categories.items()]


def _pq(gt, gt_cats, pred, pred_cats, crowd=()) -> dict:
    stats = image_stats(1, gt, _segments(gt, gt_cats, crowd), pred, _segments(pred, pred_cats), INDEX, "test")
    return summarize(stats, CATEGORIES)


def _image(*regions) -> np.ndarray:
    """A 10x10 id map; each region is (id, rows slice, cols slice), painted in order."""
    ids = np.zeros((10, 10), np.uint32)
    for sid, rows, cols in regions:
        ids[rows, cols] = sid
    return ids


def test_identical_segmentation_scores_one():
    gt = _image((5, slice(0, 4), slice(0, 10)), (6, slice(4, 10), slice(0, 10)))
    result = _pq(gt, {5: 1, 6: 3}, gt, {5: 1, 6: 3})
    assert result["All"] == {"pq": 1.0, "sq": 1.0, "rq": 1.0, "n": 2}
    assert result["per_class"]["1"] == {"pq": 1.0, "sq": 1.0, "rq": 1.0, "tp": 1, "fp": 0, "fn": 0, "iou": 1.0}
    assert result["per_class"]["2"]["tp"] + result["per_class"]["2"]["fp"] == 0  # listed, not averaged


def test_split_gives_one_match_and_one_false_positive():
    gt = _image((1, slice(0, 10), slice(0, 10)))  # 100 px
    pred = _image((7, slice(0, 10), slice(0, 6)), (8, slice(0, 10), slice(6, 10)))  # 60 + 40 px
    per_class = _pq(gt, {1: 1}, pred, {7: 1, 8: 1})["per_class"]["1"]
    assert (per_class["tp"], per_class["fp"], per_class["fn"]) == (1, 1, 0)
    assert per_class["iou"] == pytest.approx(0.6, abs=1e-15)
    assert per_class["pq"] == pytest.approx(0.6 / 1.5, abs=1e-15)


def test_merge_matches_the_larger_part_and_misses_the_other():
    gt = _image((1, slice(0, 10), slice(0, 6)), (2, slice(0, 10), slice(6, 10)))
    pred = _image((9, slice(0, 10), slice(0, 10)))
    per_class = _pq(gt, {1: 1, 2: 1}, pred, {9: 1})["per_class"]["1"]
    assert (per_class["tp"], per_class["fp"], per_class["fn"]) == (1, 0, 1)
    assert per_class["sq"] == pytest.approx(0.6, abs=1e-15) and per_class["rq"] == pytest.approx(1 / 1.5, abs=1e-15)


def test_label_swap_is_a_miss_and_a_false_positive():
    gt = _image((1, slice(0, 10), slice(0, 10)))
    result = _pq(gt, {1: 1}, gt, {1: 2})
    assert (result["per_class"]["1"]["fn"], result["per_class"]["2"]["fp"]) == (1, 1)
    assert result["All"] == {"pq": 0.0, "sq": 0.0, "rq": 0.0, "n": 2}


def test_iou_of_exactly_one_half_is_not_a_match():
    gt = _image((1, slice(0, 10), slice(0, 5)), (3, slice(0, 10), slice(5, 10)))  # 50 px of a, 50 of stuff
    pred = _image((2, slice(0, 10), slice(0, 10)))  # 100 px of a, none on VOID: IoU 50 / 100
    per_class = _pq(gt, {1: 1, 3: 3}, pred, {2: 1})["per_class"]["1"]
    assert (per_class["tp"], per_class["fp"], per_class["fn"]) == (0, 1, 1)


def test_void_pixels_leave_the_union_and_mostly_void_predictions_are_ignored():
    # GT: 40 px of class a, the rest VOID. The prediction covers the 40 px plus 20 VOID px:
    # the union leaves the VOID out, so IoU = 40 / (60 + 40 - 40 - 20) = 1.
    gt = _image((1, slice(0, 4), slice(0, 10)))
    pred = _image((5, slice(0, 6), slice(0, 10)), (6, slice(7, 10), slice(0, 10)))  # 6: entirely on VOID
    per_class = _pq(gt, {1: 1}, pred, {5: 1, 6: 1})["per_class"]["1"]
    assert (per_class["tp"], per_class["fp"], per_class["fn"], per_class["iou"]) == (1, 0, 0, 1.0)


def test_crowd_is_never_matched_and_covers_predictions_of_its_class():
    gt = _image((1, slice(0, 5), slice(0, 10)), (2, slice(5, 10), slice(0, 10)))  # 2 is a crowd of class a
    pred = _image((1, slice(0, 5), slice(0, 10)), (7, slice(5, 10), slice(0, 4)), (8, slice(5, 10), slice(4, 10)))
    result = _pq(gt, {1: 1, 2: 1}, pred, {1: 1, 7: 1, 8: 2}, crowd=(2,))
    # 7 (class a) lies on the crowd of its class: ignored. 8 (class b) lies on a crowd of another class: FP.
    assert (result["per_class"]["1"]["tp"], result["per_class"]["1"]["fp"], result["per_class"]["1"]["fn"]) == (1, 0, 0)
    assert result["per_class"]["2"]["fp"] == 1


def test_statistics_add_exactly_in_any_grouping():
    rng = np.random.default_rng(0)
    ious = rng.uniform(0.5, 1.0, 1000).tolist()
    singles = []
    for value in ious:
        stats = PQStats.zeros(2)
        stats.tp[1], stats.iou[1] = 1, _exact(value)
        singles.append(stats)
    forward, grouped = PQStats.zeros(2), PQStats.zeros(2)
    for stats in singles:
        forward += stats
    for start in range(0, 1000, 7):  # partial sums first, then their sum, in reverse
        part = PQStats.zeros(2)
        for stats in singles[start:start + 7]:
            part += stats
        grouped += part
    assert forward.tp.tolist() == grouped.tp.tolist() == [0, 1000]
    assert forward.iou_sum(1) == grouped.iou_sum(1) == math.fsum(ious)  # exact, correctly rounded


def test_per_image_errors_name_image_and_segment():
    gt = _image((1, slice(0, 10), slice(0, 10)))
    pred = _image((1, slice(0, 10), slice(0, 10)))
    with pytest.raises(SegpipeError, match="image 1: segment 1 is in the PNG and not in the JSON"):
        image_stats(1, gt, _segments(gt, {1: 1}), pred, [], INDEX, "p.png")
    with pytest.raises(SegpipeError, match="image 1: segment 4 is in the JSON and not in the PNG"):
        image_stats(1, gt, _segments(gt, {1: 1}), pred, _segments(pred, {1: 1, 4: 1}), INDEX, "p.png")
    with pytest.raises(SegpipeError, match="segment 1 has unknown category_id 42"):
        image_stats(1, gt, _segments(gt, {1: 1}), pred, _segments(pred, {1: 42}), INDEX, "p.png")
    with pytest.raises(SegpipeError, match="prediction is 10x5 \\(HxW\\), ground truth is 10x10"):
        image_stats(1, gt, _segments(gt, {1: 1}), pred[:, :5], _segments(pred, {1: 1}), INDEX, "p.png")


@pytest.fixture(scope="module")
def predictions(dataset, tmp_path_factory):
    """Perturbed predictions (misses, shifts, swaps, splits, merges, spurious blobs) of the dataset."""
    out = tmp_path_factory.mktemp("pred") / "panoptic_pred.json"
    write_perturbed_panoptic(str(dataset / "annotations" / "panoptic_val.json"), str(out), seed=3)
    return out


def test_equals_the_panopticapi_logic_on_perturbed_predictions(dataset, predictions):
    """hotcoco's pq_compute reimplements panopticapi's; the official panopticapi agreed to 2e-16 (issue note)."""
    import hotcoco.panoptic

    gt = str(dataset / "annotations" / "panoptic_val.json")
    ours = evaluate_pq(gt, str(predictions))
    with contextlib.redirect_stdout(io.StringIO()):
        reference = hotcoco.panoptic.pq_compute(gt, str(predictions))
    assert 0.3 < ours["All"]["pq"] < 0.9  # the perturbations really cost something
    for group in ("All", "Things", "Stuff"):
        assert ours[group]["n"] == reference[group]["n"]
        for metric in ("pq", "sq", "rq"):
            assert ours[group][metric] == pytest.approx(reference[group][metric], abs=1e-9)
    for category, figures in reference["per_class"].items():
        if figures["pq"] >= 0:  # hotcoco marks absent classes -1
            for metric in ("pq", "sq", "rq"):
                assert ours["per_class"][str(category)][metric] == pytest.approx(figures[metric], abs=1e-9)


def test_parquet_predictions_give_the_same_numbers_as_png(dataset, predictions, tmp_path):
    data = json.loads(predictions.read_text())
    folder = predictions.parent / "panoptic_pred"
    images = [ImagePrediction.from_panoptic(a["image_id"], a["file_name"],
                                            decode_panoptic_png((folder / a["file_name"]).read_bytes(), ""),
                                            a["segments_info"]) for a in data["annotations"]]
    write_predictions(str(tmp_path / "t" / "part-0.parquet"), images[:7], "run", "perturb")
    write_predictions(str(tmp_path / "t" / "part-1.parquet"), images[7:], "run", "perturb")
    gt = str(dataset / "annotations" / "panoptic_val.json")
    assert evaluate_pq(gt, str(tmp_path / "t"), shard_size=5) == evaluate_pq(gt, str(predictions))


def test_workers_give_byte_identical_results(dataset, predictions, tmp_path):
    runner = CliRunner()
    outputs = []
    for k, options in enumerate((["--workers", "1", "--threads", "1"], ["--workers", "1"], ["--workers", "2"],
                                 ["--workers", "4"])):
        out = tmp_path / f"r{k}.json"
        result = runner.invoke(app, ["eval", "pq", "--gt", str(dataset / "annotations" / "panoptic_val.json"),
                                     "--pred", str(predictions), "--out", str(out), *options])
        assert result.exit_code == 0, result.output
        outputs.append(out.read_bytes())
    assert len(set(outputs)) == 1
    assert set(json.loads(outputs[0])) == {"All", "Things", "Stuff", "per_class", "semantic", "dropped_segments"}


def test_bad_inputs_are_one_line_errors(dataset, predictions, tmp_path):
    runner = CliRunner()
    gt = str(dataset / "annotations" / "panoptic_val.json")
    data = json.loads(predictions.read_text())

    def run(change, name):
        broken = json.loads(json.dumps(data))
        change(broken)
        path = predictions.parent / f"{name}.json"
        path.write_text(json.dumps(broken))
        shutil.copytree(predictions.parent / "panoptic_pred", predictions.parent / name, dirs_exist_ok=True)
        result = runner.invoke(app, ["eval", "pq", "--gt", gt, "--pred", str(path)])
        assert result.exit_code == 2 and result.stderr.count("\n") == 1, result.output
        return result.stderr

    assert "prediction for image 77, which is not in the ground truth" in run(
        lambda d: d["annotations"].append({**d["annotations"][0], "image_id": 77}), "stray")
    assert "no prediction for image 1" in run(lambda d: d["annotations"].pop(0), "missing")
    assert "holds no predictions" in run(lambda d: d["annotations"].clear(), "empty")
    assert "has unknown category_id 999" in run(
        lambda d: d["annotations"][0]["segments_info"][0].update(category_id=999), "category")
    assert "is in the PNG and not in the JSON" in run(lambda d: d["annotations"][0]["segments_info"].pop(0), "unlisted")


def test_every_combination_of_json_and_tables_gives_the_same_bytes(dataset, predictions, tmp_path):
    """GT as JSON + PNGs or a dataset table; predictions as JSON + PNGs, a dataset table or the predictions
    table; one worker on 1 and 3 threads, 2 workers, shards of 5: one set of bytes. The tables are intersected
    from their RLE runs."""
    from pipeline.convert import convert

    gt_json = str(dataset / "annotations" / "panoptic_val.json")
    convert(gt_json, str(tmp_path / "gt-table"), row_group_images=4)
    convert(str(predictions), str(tmp_path / "pred-table"), row_group_images=4)
    data = json.loads(predictions.read_text())
    folder = predictions.parent / "panoptic_pred"
    write_predictions(str(tmp_path / "pred-rows" / "part-0.parquet"),
                      [ImagePrediction.from_panoptic(a["image_id"], a["file_name"],
                                                     decode_panoptic_png((folder / a["file_name"]).read_bytes(), ""),
                                                     a["segments_info"]) for a in data["annotations"]], "run", "m")
    outputs = set()
    for gt in (gt_json, str(tmp_path / "gt-table")):
        for pred in (str(predictions), str(tmp_path / "pred-table"), str(tmp_path / "pred-rows")):
            for workers, threads in ((1, 1), (1, 3), (2, None)):
                outputs.add(json.dumps(evaluate_pq(gt, pred, workers=workers, threads=threads, shard_size=5)))
    assert len(outputs) == 1
    result = json.loads(outputs.pop())
    assert 0.3 < result["All"]["pq"] < 0.9 and result["All"]["n"] > 5



def test_unknown_categories_are_refused_or_made_void(dataset, predictions, tmp_path):
    """--drop-unknown-categories scores a prediction as if those segments' pixels were VOID (what training
    validation does with a model that knows more classes), from JSON + PNGs and from a table alike."""
    from pipeline.structures import encode_panoptic_png

    gt = str(dataset / "annotations" / "panoptic_val.json")
    data = json.loads(predictions.read_text())
    folder = predictions.parent / "panoptic_pred"
    foreign, voided = json.loads(json.dumps(data)), json.loads(json.dumps(data))
    (tmp_path / "foreign").mkdir()
    (tmp_path / "voided").mkdir()
    for k, annotation in enumerate(data["annotations"]):
        ids = decode_panoptic_png((folder / annotation["file_name"]).read_bytes(), "")
        (tmp_path / "foreign" / annotation["file_name"]).write_bytes((folder / annotation["file_name"]).read_bytes())
        if k % 3 == 0 and annotation["segments_info"]:
            segment = annotation["segments_info"][0]
            foreign["annotations"][k]["segments_info"][0]["category_id"] = 999
            voided["annotations"][k]["segments_info"].pop(0)
            ids = np.where(ids == segment["id"], 0, ids)
        (tmp_path / "voided" / annotation["file_name"]).write_bytes(encode_panoptic_png(ids))
    (tmp_path / "foreign.json").write_text(json.dumps(foreign))
    (tmp_path / "voided.json").write_text(json.dumps(voided))
    result = CliRunner().invoke(app, ["eval", "pq", "--gt", gt, "--pred", str(tmp_path / "foreign.json")])
    assert result.exit_code == 2 and "has unknown category_id 999" in result.stderr and "--drop-unknown" in result.stderr
    dropped = evaluate_pq(gt, str(tmp_path / "foreign.json"), drop_unknown_categories=True)
    expected = evaluate_pq(gt, str(tmp_path / "voided.json"))
    assert dropped.pop("dropped_segments") == 4 and expected.pop("dropped_segments") == 0
    assert dropped == expected and dropped["All"]["pq"] != evaluate_pq(gt, str(predictions))["All"]["pq"]
    from pipeline.convert import convert

    convert(str(tmp_path / "foreign.json"), str(tmp_path / "foreign-table"))
    from_table = evaluate_pq(gt, str(tmp_path / "foreign-table"), drop_unknown_categories=True)
    assert from_table.pop("dropped_segments") == 4 and from_table == expected
