"""Synthetic datasets: reproducible bytes, COCO files pycocotools takes, scenes with every hard case."""

import json
from pathlib import Path

import numpy as np
from pycocotools.coco import COCO
from pycocotools.cocoeval import COCOeval

from pipeline.io.shards import list_shards, read_shard
from pipeline.structures import decode_panoptic_png
from pipeline.synth import SynthConfig, write_dataset


def _files(root: Path) -> dict[str, bytes]:
    return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


def test_same_seed_gives_the_same_bytes_whatever_the_worker_count(tmp_path):
    config = SynthConfig(images=9, split="train", seed=3, shard_size=4)
    write_dataset(str(tmp_path / "a"), config)
    write_dataset(str(tmp_path / "b"), SynthConfig(**{**config.__dict__, "workers": 2}))
    a, b = _files(tmp_path / "a"), _files(tmp_path / "b")
    assert len(a) == 9 * 2 + 2 + 3  # JPEGs, PNGs, two JSONs, three tar shards
    assert a == b
    write_dataset(str(tmp_path / "c"), SynthConfig(**{**config.__dict__, "seed": 4}))
    assert _files(tmp_path / "c")["train/000000000001.jpg"] != a["train/000000000001.jpg"]


def test_layout_is_the_standard_coco_one(dataset):
    assert sorted(p.name for p in (dataset / "annotations").iterdir()) == [
        "instances_val.json", "panoptic_val", "panoptic_val.json"]
    assert len(list((dataset / "val").glob("*.jpg"))) == 12
    assert len(list((dataset / "annotations" / "panoptic_val").glob("*.png"))) == 12
    assert sorted(p.name for p in (dataset / "shards").iterdir()) == ["val-00000.tar", "val-00001.tar", "val-00002.tar"]


def test_tar_shards_hold_the_same_images_as_the_folder(dataset):
    from_tars = {r.key: r.data for s in list_shards(str(dataset / "shards")) for r in read_shard(s)}
    from_folder = {r.key: r.data for s in list_shards(str(dataset / "val")) for r in read_shard(s)}
    assert len(from_tars) == 12 and from_tars == from_folder


def test_pycocotools_loads_instances_and_scores_ground_truth_as_perfect(dataset):
    gt = COCO(str(dataset / "annotations" / "instances_val.json"))
    assert len(gt.getImgIds()) == 12 and len(gt.getCatIds()) == 6
    results = [{"image_id": a["image_id"], "category_id": a["category_id"], "bbox": a["bbox"],
                "segmentation": gt.annToRLE(a), "score": 1.0}
               for a in gt.dataset["annotations"] if not a["iscrowd"]]
    for a in results:  # annToRLE gives bytes for polygons, the stored str for RLE
        counts = a["segmentation"]["counts"]
        a["segmentation"]["counts"] = counts.decode() if isinstance(counts, bytes) else counts
    for iou_type in ("segm", "bbox"):
        evaluator = COCOeval(gt, gt.loadRes(results), iou_type)
        evaluator.evaluate()
        evaluator.accumulate()
        evaluator.summarize()
        assert evaluator.stats[0] == 1.0 and evaluator.stats[1] == 1.0


def test_scenes_hold_every_case_evaluation_must_handle(tmp_path):
    write_dataset(str(tmp_path), SynthConfig(images=40, split="s", seed=11))
    panoptic = json.loads((tmp_path / "annotations" / "panoptic_s.json").read_text())
    instances = json.loads((tmp_path / "annotations" / "instances_s.json").read_text())
    things = {c["id"] for c in panoptic["categories"] if c["isthing"]}
    segments = [s for a in panoptic["annotations"] for s in a["segments_info"]]
    stuff = {s["category_id"] for s in segments if s["category_id"] not in things}
    areas = [s["area"] for s in segments if s["category_id"] in things and not s["iscrowd"]]
    assert len(stuff) >= 4 and len({s["category_id"] for s in segments if s["category_id"] in things}) == 6
    assert min(areas) < 32**2 and max(areas) > 96**2 and any(32**2 <= a <= 96**2 for a in areas)
    assert any(s["iscrowd"] for s in segments)
    assert any(s["id"] > 65535 for s in segments)
    kinds = {("polygons" if isinstance(a["segmentation"], list) else
              "uncompressed" if isinstance(a["segmentation"]["counts"], list) else "rle") for a in instances["annotations"]}
    assert kinds == {"polygons", "uncompressed", "rle"}  # unoccluded, crowd, occluded
    void_images = 0
    for annotation in panoptic["annotations"]:
        ids = decode_panoptic_png((tmp_path / "annotations" / "panoptic_s" / annotation["file_name"]).read_bytes(), "")
        void_images += bool((ids == 0).any())
        assert {int(i) for i in np.unique(ids)} - {0} == {s["id"] for s in annotation["segments_info"]}
    assert void_images >= 5
    # Instances are the panoptic thing segments, one for one, with the same areas.
    assert sorted(a["area"] for a in instances["annotations"]) == sorted(
        s["area"] for s in segments if s["category_id"] in things)
