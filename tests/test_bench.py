"""`segpipe bench eval` at a tiny size, the COCO-shaped random instances, and results -> predictions table."""

import json

import pytest

from pipeline.bench import MISMATCH, plan, run, table
from pipeline.bench_data import COCO_MISSING_IDS, SHAPES, random_instances
from pipeline.convert import convert
from pipeline.evaluate.ap import evaluate_ap
from pipeline.io.tables import parquet_files, read_predictions

TOOLS = {"segpipe", "hotcoco"}  # and the references, which plan() always keeps: pycocotools, torchmetrics


@pytest.fixture(scope="module")
def report(tmp_path_factory):
    root = tmp_path_factory.mktemp("bench")
    return run(root / "data", images=12, height=96, width=128, repeat=1, workers=[1], out=root / "report.json",
               tasks=["ap-many", "pq", "miou"], tools=TOOLS, echo=lambda line: None)


def test_every_row_has_numbers_but_ap_with_a_ground_truth_table_until_evaluate_ap_reads_one(report):
    for row in report["rows"]:
        if (row["task"], row["input"]) == ("ap", "tables") and row["numbers"] is None:
            assert "gt-table" in row["error"]  # evaluate_ap takes a COCO JSON ground truth today
            continue
        assert row["numbers"] and row["seconds"] > 0 and row["peak_rss_mb"] > 0, row
    assert {(r["task"], r["tool"]) for r in report["rows"]} >= {
        ("ap", "pycocotools"), ("ap", "hotcoco"), ("ap", "segpipe"), ("pq", "hotcoco"), ("pq", "segpipe"),
        ("miou", "torchmetrics"), ("miou", "segpipe")}
    assert {r["shape"] for r in report["rows"] if r["task"] == "pq"} == {"synth", "few", "many"}  # not only synth's data


def test_speeds_are_the_other_tools_median_over_the_rows(report):
    rows = [r for r in report["rows"] if r["numbers"]]
    for row in rows:
        for other in rows:
            same = (other["task"], other["shape"], other["iou_type"]) == (row["task"], row["shape"], row["iou_type"])
            if same and f"speed_vs_{other['tool']}" in row:
                assert row[f"speed_vs_{other['tool']}"] == other["seconds"] / row["seconds"]
    assert all("speed_vs_pycocotools" in r and "speed_vs_hotcoco" in r for r in rows if r["task"] == "ap")


def test_segpipe_rows_equal_the_references(report):
    segpipe = [r for r in report["rows"] if r["tool"] == "segpipe" and r["numbers"]]
    assert {r["task"] for r in segpipe} == {"ap", "pq", "miou"}
    for row in segpipe:
        assert row["max_abs_diff"] < MISMATCH and not row["mismatch"], row


def test_the_table_holds_every_row_and_no_mismatch(report):
    assert len(table(report).splitlines()) >= len(report["rows"]) + 1
    assert "MISMATCH" not in table(report)


def test_plan_keeps_the_references_and_adds_segpipe_workers_and_threads():
    specs = plan(["ap-few", "pq"], list(SHAPES), [1, 2], tools={"segpipe"}, threads=[0, 1])
    assert {(s["tool"], s["workers"], s["threads"]) for s in specs if s["task"] == "pq"} == {
        ("hotcoco", 1, 0), ("segpipe", 1, 0), ("segpipe", 1, 1), ("segpipe", 2, 0)}  # threads: with one worker
    assert {s["iou_type"] for s in specs if s["task"] == "ap"} == {"segm", "bbox"}
    with pytest.raises(ValueError, match="ap-some"):
        plan(["ap-some"], list(SHAPES), [1])


def test_random_instances_look_like_coco():
    import numpy as np

    gt, results = random_instances(SHAPES["many"], 30, 96, 128, np.random.default_rng(0))
    assert not {c["id"] for c in gt["categories"]} & set(COCO_MISSING_IDS) and len(gt["categories"]) == 80
    crowds = [a for a in gt["annotations"] if a["iscrowd"]]
    polygons = [a for a in gt["annotations"] if not a["iscrowd"]]
    assert all(isinstance(a["segmentation"]["counts"], list) and isinstance(a["area"], int) for a in crowds)
    assert all(isinstance(a["area"], float) and all(isinstance(v, float) for v in a["segmentation"][0]) for a in polygons)
    assert all(isinstance(r["segmentation"]["counts"], str) for r in results)
    assert len({r["score"] for r in results}) < len(results) / 4  # tied scores


def test_results_become_a_predictions_table_with_the_same_ap(tmp_path):
    import numpy as np

    gt, results = random_instances(SHAPES["few"], 40, 64, 80, np.random.default_rng(1))
    results.append({k: v for k, v in results[0].items() if k != "segmentation"})  # a box-only result
    gt_json, results_json = tmp_path / "gt.json", tmp_path / "results.json"
    gt_json.write_text(json.dumps(gt))
    results_json.write_text(json.dumps(results))
    done = convert(str(results_json), str(tmp_path / "table"), gt=str(gt_json), row_group_images=7)
    assert done.kind == "predictions" and done.segments == len(results)
    files = parquet_files(str(tmp_path / "table"))
    assert len(files) > 1
    predictions = read_predictions(files)
    assert [p.image_id for p in predictions] == sorted({r["image_id"] for r in results})
    first = next(p for p in predictions if p.image_id == results[0]["image_id"])
    assert [s.score for s in first.segments] == [r["score"] for r in results if r["image_id"] == first.image_id]
    assert first.segments[0].rle.counts == results[0]["segmentation"]["counts"] and first.segments[0].id == 1
    for iou_type in ("segm", "bbox"):
        assert (evaluate_ap(str(gt_json), str(tmp_path / "table"), iou_type)["stats"]
                == evaluate_ap(str(gt_json), str(results_json), iou_type)["stats"])


def test_ap_from_both_tables_equals_ap_from_both_files(tmp_path):
    import numpy as np

    gt, results = random_instances(SHAPES["many"], 20, 64, 80, np.random.default_rng(2))
    gt_json, results_json = tmp_path / "gt.json", tmp_path / "results.json"
    gt_json.write_text(json.dumps(gt))
    results_json.write_text(json.dumps(results))
    convert(str(gt_json), str(tmp_path / "gt-table"), row_group_images=6)
    convert(str(results_json), str(tmp_path / "pred-table"), gt=str(gt_json), row_group_images=6)
    for iou_type in ("segm", "bbox"):
        assert (evaluate_ap(str(tmp_path / "gt-table"), str(tmp_path / "pred-table"), iou_type)["stats"]
                == evaluate_ap(str(gt_json), str(results_json), iou_type)["stats"])
