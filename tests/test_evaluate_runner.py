"""Shards as Ray tasks on a real local Ray instance: same numbers as in-process, user errors as one line."""

import json

import pytest

from pipeline.errors import SegpipeError
from pipeline.evaluate.ap import evaluate_ap
from pipeline.evaluate.pq import evaluate_pq
from pipeline.evaluate.runner import map_shards
from pipeline.io.fs import read_json
from pipeline.synth import perturb_instances, write_perturbed_panoptic


@pytest.fixture(scope="module")
def ray_cluster():
    ray = pytest.importorskip("ray")
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False)
    yield "auto"
    ray.shutdown()


def _cocoeval(gt_json: str, results_json: str, iou_type: str) -> list[float]:
    from pycocotools.coco import COCO
    from pycocotools.cocoeval import COCOeval

    gt = COCO(gt_json)
    evaluator = COCOeval(gt, gt.loadRes(results_json), iou_type)
    evaluator.evaluate()
    evaluator.accumulate()
    evaluator.summarize()
    return evaluator.stats.tolist()


def test_ray_tasks_give_the_in_process_results(ray_cluster, dataset, tmp_path):
    from collections import Counter

    import numpy as np

    gt_panoptic = str(dataset / "annotations" / "panoptic_val.json")
    pred = str(tmp_path / "panoptic_pred.json")
    write_perturbed_panoptic(gt_panoptic, pred, seed=4)
    in_process = evaluate_pq(gt_panoptic, pred)
    assert evaluate_pq(gt_panoptic, pred, address=ray_cluster, shard_size=5) == in_process
    # Not a degenerate result that any two runs would share: every non-crowd ground-truth segment (counted
    # from the file) is matched or missed once, and the perturbation leaves some matched, some not.
    gt = json.loads((dataset / "annotations" / "panoptic_val.json").read_text())
    truth = Counter(s["category_id"] for a in gt["annotations"] for s in a["segments_info"] if not s["iscrowd"])
    assert {int(c): f["tp"] + f["fn"] for c, f in in_process["per_class"].items()} == {
        c["id"]: truth[c["id"]] for c in gt["categories"]}
    assert 0 < in_process["All"]["pq"] < 1
    gt_instances = dataset / "annotations" / "instances_val.json"
    results = tmp_path / "results.json"
    results.write_text(json.dumps(perturb_instances(json.loads(gt_instances.read_text()), np.random.default_rng(1))))
    for iou_type in ("segm", "bbox"):
        on_ray = evaluate_ap(str(gt_instances), str(results), iou_type, address=ray_cluster, shard_size=4)
        assert on_ray == evaluate_ap(str(gt_instances), str(results), iou_type)
        reference = _cocoeval(str(gt_instances), str(results), iou_type)
        assert on_ray["stats"] == pytest.approx(reference, abs=1e-12) and 0 < reference[0] < 1, iou_type


def test_user_errors_inside_ray_tasks_and_worker_processes_come_back_as_one_line(ray_cluster, tmp_path):
    # Shards must be importable where they run (tests/ is not on a Ray worker's path): use a package function.
    good = [tmp_path / f"{i}.json" for i in range(3)]
    for i, path in enumerate(good):
        path.write_text(json.dumps({"shard": i}))
    shards = [str(p) for p in good]
    missing = str(tmp_path / "missing.json")
    with pytest.raises(SegpipeError, match="^.*missing.json: no such file$"):
        map_shards(read_json, [*shards, missing], address=ray_cluster)
    with pytest.raises(SegpipeError, match="^.*missing.json: no such file$"):
        map_shards(read_json, [*shards, missing], workers=2)
    assert map_shards(read_json, shards, workers=2) == [{"shard": 0}, {"shard": 1}, {"shard": 2}]


def test_tables_and_files_give_the_same_bytes_in_process_on_workers_and_on_ray(ray_cluster, dataset, tmp_path):
    """PQ, AP and mIoU: ground truth and predictions as COCO files or as tables (`segpipe convert`), in this
    process, on 2 worker processes and as Ray tasks: one set of bytes per metric."""
    import numpy as np

    from pipeline.convert import convert
    from pipeline.evaluate.miou import evaluate_miou

    gt_panoptic = str(dataset / "annotations" / "panoptic_val.json")
    pred_panoptic = str(tmp_path / "panoptic_pred.json")
    write_perturbed_panoptic(gt_panoptic, pred_panoptic, seed=5)
    gt_instances = str(dataset / "annotations" / "instances_val.json")
    results = tmp_path / "results.json"
    results.write_text(json.dumps(perturb_instances(json.loads(open(gt_instances).read()), np.random.default_rng(2))))
    for source, out, gt in ((gt_panoptic, "gt-pan", None), (pred_panoptic, "pred-pan", None),
                            (gt_instances, "gt-inst", None), (str(results), "pred-inst", gt_instances)):
        convert(source, str(tmp_path / out), row_group_images=3, gt=gt)
    runs = {"in process": {}, "workers": {"workers": 2}, "ray": {"address": ray_cluster}}
    cases = {
        "pq": (evaluate_pq, [(gt_panoptic, pred_panoptic), (str(tmp_path / "gt-pan"), str(tmp_path / "pred-pan"))]),
        "miou": (evaluate_miou, [(gt_panoptic, pred_panoptic), (str(tmp_path / "gt-pan"), str(tmp_path / "pred-pan"))]),
        "ap": (evaluate_ap, [(gt_instances, str(results)), (str(tmp_path / "gt-inst"), str(tmp_path / "pred-inst"))]),
    }
    for metric, (evaluate, inputs) in cases.items():
        outputs = {json.dumps(evaluate(gt, pred, shard_size=4, **run)) for gt, pred in inputs for run in runs.values()}
        assert len(outputs) == 1, metric
    assert 0 < json.loads(outputs.pop())["stats"][0] < 1
