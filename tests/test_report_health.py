"""The report's Health section: planted problems found with hand-computed ids and counts; synth's own data clean."""

import copy
import io
import json
import shutil
import tempfile
from collections import defaultdict

import numpy as np
import pytest
from PIL import Image

from pipeline.report import health as health_module
from pipeline.report.health import HealthSettings, HealthShard, global_checks, merge, shard_checks, spill
from pipeline.report.parts import Parts
from pipeline.synth import SynthConfig, write_dataset

SIZE = 96  # small images; 40 of them give every synth category at least 10 instances (distribution stays clean)


@pytest.fixture(scope="module")
def synth(tmp_path_factory):
    """Two clean synthetic splits, val and train, with tar shards."""
    root = tmp_path_factory.mktemp("health")
    for split, seed in (("val", 7), ("train", 8)):
        write_dataset(str(root), SynthConfig(images=40, split=split, seed=seed, height=SIZE, width=SIZE, shard_size=16))
    return root


def _load(root, kind, split):
    return json.loads((root / "annotations" / f"{kind}_{split}.json").read_text())


def health(sets, shard_size=16, settings=HealthSettings()):
    """What the report's orchestrator does: global checks per file, shard checks per run of images, one merge.

    `sets`: (split, kind, coco, image_root, png_root) per GT file.
    """
    results, parts, hashes = [], [], Parts(tempfile.mkdtemp())
    for split, kind, coco, image_root, png_root in sets:
        results.append(global_checks(coco, kind, split, settings=settings))
        by_image = defaultdict(list)
        for ann in coco["annotations"]:
            by_image[ann["image_id"]].append(ann)
        images = sorted(coco["images"], key=lambda im: im["id"])
        for start in range(0, len(images), shard_size):
            chunk = images[start:start + shard_size]
            annotations = [a for im in chunk for a in by_image.pop(im["id"], [])]
            part = shard_checks(HealthShard(chunk, annotations, kind, coco["categories"], image_root, png_root, split),
                                settings)
            parts.append(spill(part, hashes, start))
    try:
        return merge(results[0] if len(results) == 1 else results, parts, hashes)
    finally:
        hashes.remove()


def found(result):
    """check -> (count, ids) of every finding (one split at a time in these tests, or leakage)."""
    return {f["check"]: (f["count"], f["ids"]) for f in result["findings"]}


@pytest.mark.parametrize("kind", ["instances", "panoptic"])
def test_synth_data_is_clean(synth, kind):
    result = health([("val", kind, _load(synth, kind, "val"), str(synth / "val"),
                      str(synth / "annotations" / "panoptic_val"))])
    assert result["findings"] == []
    assert set(result["counts"].values()) == {0}
    assert {"duplicate_image_id", "near_duplicate", "low_instance_category", "area_mask_mismatch",
            "image_unreadable", "near_duplicate_image"} <= set(result["checked"])
    assert ("self_overlap" in result["checked"]) == (kind == "instances")
    assert ("unlisted_segment" in result["checked"]) == (kind == "panoptic")


def test_two_clean_splits_do_not_leak(synth):
    sets = [(split, "instances", _load(synth, "instances", split), str(synth / split), None) for split in ("val", "train")]
    result = health(sets)
    assert result["findings"] == []
    assert {"leaked_image", "leaked_near_duplicate"} <= set(result["checked"])


def _jpeg(pixels, quality=90):
    out = io.BytesIO()
    Image.fromarray(pixels).save(out, format="JPEG", quality=quality)
    return out.getvalue()


@pytest.fixture
def planted(synth, tmp_path):
    """The val split (instances) with one of each problem planted, and a train split that leaks two images."""
    for split in ("val", "train"):
        shutil.copytree(synth / split, tmp_path / split)
    coco = _load(synth, "instances", "val")
    train = _load(synth, "instances", "train")
    images = {im["id"]: im for im in coco["images"]}
    val_dir, train_dir = tmp_path / "val", tmp_path / "train"

    def pixels(image_id):
        return np.asarray(Image.open(val_dir / images[image_id]["file_name"]).convert("RGB"))

    # Image files: an exact copy under a new name (id 1001 = image 3), a re-encoded copy (1002 ~ image 4),
    # image 5's file replaced by a smaller picture, image 6's by bytes that are no image, image 7's file deleted.
    shutil.copy(val_dir / images[3]["file_name"], val_dir / "copy.jpg")
    (val_dir / "reencoded.jpg").write_bytes(_jpeg(pixels(4), quality=40))
    coco["images"] += [{"id": 1001, "file_name": "copy.jpg", "height": SIZE, "width": SIZE},
                       {"id": 1002, "file_name": "reencoded.jpg", "height": SIZE, "width": SIZE}]
    (val_dir / images[5]["file_name"]).write_bytes(_jpeg(pixels(5)[:80]))
    (val_dir / images[6]["file_name"]).write_bytes(b"not an image")
    (val_dir / images[7]["file_name"]).unlink()
    # Leakage: train's image 1 is val's image 8, train's image 2 is val's image 9 brightened.
    shutil.copy(val_dir / images[8]["file_name"], train_dir / train["images"][0]["file_name"])
    brighter = np.clip(pixels(9).astype(int) + 12, 0, 255).astype(np.uint8)
    (train_dir / train["images"][1]["file_name"]).write_bytes(_jpeg(brighter))

    anns = coco["annotations"]
    rle = [a for a in anns if isinstance(a["segmentation"], dict) and isinstance(a["segmentation"]["counts"], str)]
    single = [a for a in anns if isinstance(a["segmentation"], list) and len(a["segmentation"]) == 1]
    broken, empty, shifted, bigger = rle[0], rle[1], rle[2], rle[3]
    broken["segmentation"] = {"size": [SIZE, SIZE], "counts": [10, 5]}  # 15 pixels of 9,216
    empty["segmentation"] = {"size": [SIZE, SIZE], "counts": [SIZE * SIZE]}
    empty["area"], empty["bbox"] = 0, [0.0, 0.0, 0.0, 0.0]
    shifted["bbox"] = [shifted["bbox"][0] - 1, shifted["bbox"][1], shifted["bbox"][2], shifted["bbox"][3]]
    bigger["area"] += 50
    twice = single[0]
    twice["segmentation"] = twice["segmentation"] * 2  # the same polygon drawn twice
    outside = single[1]
    outside["segmentation"] = [[90.0, 90.0, 100.0, 90.0, 100.0, 100.0, 90.0, 100.0]]  # clipped to 6 x 6 pixels
    outside["area"], outside["bbox"] = 100.0, [90.0, 90.0, 10.0, 10.0]  # as measured on the polygon
    renumbered = single[2]
    renumbered["id"] = single[3]["id"]
    copy_of = single[4]
    top = max(a["id"] for a in anns)
    anns += [
        {**copy.deepcopy(copy_of), "id": top + 1},  # a near-duplicate annotation (IoU 1)
        {**copy.deepcopy(copy_of), "id": top + 2, "image_id": 999_999},  # an orphan
        {"id": top + 3, "image_id": 1, "category_id": 1, "iscrowd": 0, "area": 0, "bbox": [0, 0, 0, 5]},
        {"id": top + 4, "image_id": 1, "category_id": 1, "iscrowd": 0, "area": 84, "bbox": [10, 10, 42, 2]},
        {"id": top + 5, "image_id": 1, "category_id": 1, "iscrowd": 0},
    ]
    ids = {"broken": broken["id"], "empty": empty["id"], "shifted": shifted["id"], "bigger": bigger["id"],
           "twice": twice["id"], "outside": outside["id"], "renumbered": renumbered["id"],
           "copy_of": copy_of["id"], "top": top}
    return coco, train, tmp_path, ids


def test_planted_problems_are_found_with_their_ids(planted):
    coco, train, root, ids = planted
    result = health([("val", "instances", coco, str(root / "val"), None),
                     ("train", "instances", train, str(root / "train"), None)], shard_size=7)
    by_check = {(f["check"], f["split"]): (f["count"], f["ids"]) for f in result["findings"]}
    top = ids["top"]
    assert by_check == {
        ("duplicate_ann_id", "val"): (1, [ids["renumbered"]]),
        ("orphan_image_id", "val"): (1, [top + 2]),
        ("missing_geometry", "val"): (1, [top + 5]),
        ("degenerate_bbox", "val"): (2, [top + 3, ids["empty"]]),  # image 1 first; the empty mask's box is 0 x 0
        ("bbox_out_of_bounds", "val"): (1, [ids["outside"]]),
        ("extreme_aspect_ratio", "val"): (1, [top + 4]),  # 42 / 2 = 21 > 20
        ("near_duplicate", "val"): (2, sorted([ids["copy_of"], top + 1])),
        ("broken_mask", "val"): (1, [ids["broken"]]),
        ("empty_mask", "val"): (1, [ids["empty"]]),
        ("area_mask_mismatch", "val"): (1, [ids["bigger"]]),
        ("box_mask_mismatch", "val"): (1, [ids["shifted"]]),
        ("mask_out_of_bounds", "val"): (1, [ids["outside"]]),
        ("self_overlap", "val"): (1, [ids["twice"]]),
        ("near_duplicate_mask", "val"): (2, sorted([ids["copy_of"], top + 1])),
        ("image_missing", "val"): (1, [7]),
        ("image_unreadable", "val"): (1, [6]),
        ("image_size_mismatch", "val"): (1, [5]),
        ("duplicate_image", "val"): (1, [[3, 1001]]),
        ("near_duplicate_image", "val"): (1, [[4, 1002]]),
        ("leaked_image", None): (1, [[["val", 8], ["train", 1]]]),
        ("leaked_near_duplicate", None): (1, [[["val", 9], ["train", 2]]]),
    }
    assert result["counts"] == {"structure": 3, "quality": 6, "distribution": 0, "masks": 8, "images": 5,
                                "leakage": 2}
    severity = {f["check"]: f["severity"] for f in result["findings"]}
    assert severity["leaked_image"] == "error" and severity["near_duplicate_image"] == "warning"
    detail = {f["check"]: f["detail"] for f in result["findings"]}
    assert "counts add up to 15, expected 9216 pixels" in detail["broken_mask"]
    assert result["summary"]["val"]["images_without_annotations"] == 2  # the two added image copies


def test_merge_does_not_depend_on_the_shards(planted):
    coco, train, root, _ = planted
    sets = [("val", "instances", coco, str(root / "val"), None)]
    assert health(sets, shard_size=5) == health(sets, shard_size=100)


def test_the_duplicate_search_in_small_chunks_finds_the_same(planted, monkeypatch):
    coco, train, root, _ = planted
    for k, image in enumerate([im for im in coco["images"] if im["id"] in (2, 10, 11)] * 2):  # two copies of each
        shutil.copy(root / "val" / image["file_name"], root / "val" / f"copy-{k}.jpg")
        coco["images"].append({**image, "id": 2000 + k, "file_name": f"copy-{k}.jpg"})
    sets = [("val", "instances", coco, str(root / "val"), None), ("train", "instances", train, str(root / "train"), None)]
    whole = found(health(sets))
    monkeypatch.setattr(health_module, "HASH_ROWS", 3)  # three fingerprints a chunk: every pair across chunks
    assert found(health(sets)) == whole
    # planted: image 3 and its copy 1001; each listed file: the first listing and its two copies
    assert whole["duplicate_image"] == (7, [[2, 2000], [2, 2003], [3, 1001], [10, 2001], [10, 2004], [11, 2002],
                                            [11, 2005]])
    assert whole["leaked_image"] == (1, [[["val", 8], ["train", 1]]])


def test_images_read_from_tar_shards_as_from_the_folder(synth):
    coco = _load(synth, "instances", "val")
    coco["images"] += [{**coco["images"][2], "id": 1001}]  # the same file listed twice: a duplicate image
    folder = health([("val", "instances", coco, str(synth / "val"), None)])
    shards = health([("val", "instances", coco, str(synth / "shards" / "val-*.tar"), None)])
    assert folder == shards
    assert found(folder) == {"duplicate_image": (1, [[3, 1001]])}


def test_panoptic_planted_problems(synth, tmp_path):
    png_root = tmp_path / "png"
    shutil.copytree(synth / "annotations" / "panoptic_val", png_root)
    coco = _load(synth, "panoptic", "val")
    first, second, third, fourth = coco["annotations"][:4]
    a, b = first["segments_info"][:2]
    a["area"] += 1
    b["bbox"] = [b["bbox"][0] + 1, *b["bbox"][1:]]
    dropped = second["segments_info"].pop()
    third["segments_info"].append({"id": 1, "category_id": 1, "iscrowd": 0, "area": 4, "bbox": [0, 0, 2, 2]})
    (png_root / fourth["file_name"]).write_bytes(b"garbage")
    result = health([("val", "panoptic", coco, None, str(png_root))])
    assert found(result) == {
        "empty_mask": (1, [[3, 1]]),
        "area_mask_mismatch": (1, [[1, a["id"]]]),
        "box_mask_mismatch": (1, [[1, b["id"]]]),
        "png_unreadable": (1, [4]),
        "unlisted_segment": (1, [[2, dropped["id"]]]),
    }
    assert result["counts"] == {"structure": 0, "quality": 0, "distribution": 0, "masks": 3, "panoptic": 2}


def test_global_checks_count_categories_and_check_predictions(synth):
    coco = _load(synth, "instances", "val")
    coco["categories"].append({"id": 90, "name": "unused", "supercategory": "none"})
    coco["categories"].append(dict(coco["categories"][0]))
    rare = coco["annotations"][0]["category_id"]
    coco["annotations"] = [a for a in coco["annotations"] if a["category_id"] != rare or a["id"] < 30]
    n_rare = sum(a["category_id"] == rare for a in coco["annotations"])
    assert 0 < n_rare < 10
    predictions = [{"image_id": 1, "category_id": 1, "score": 0.5}, {"image_id": 77_777, "category_id": 1, "score": 0.5},
                   {"image_id": 1, "category_id": 2, "score": 1.5}, {"image_id": 1, "category_id": 1}]
    result = global_checks(coco, "instances", "val", predictions)
    assert {check: (f.count, f.ids) for check, f in result["found"].items()} == {
        "duplicate_category_id": (1, [coco["categories"][0]["id"]]),
        "zero_instance_category": (1, [90]),
        "low_instance_category": (1, [rare]),
        "dt_orphan_image_id": (1, [2]),
        "dt_orphan_category_id": (1, [3]),  # category 2 is no synth category
        "dt_score_out_of_range": (1, [3]),
        "dt_missing_score": (1, [4]),
    }
    counts = [sum(a["category_id"] == c["id"] for a in coco["annotations"]) for c in coco["categories"][:6]]
    assert result["summary"]["imbalance_ratio"] == max(counts) / n_rare


def test_a_finding_counts_everything_and_lists_the_first_50_ids_across_shards(synth):
    coco = _load(synth, "instances", "val")
    top = max(a["id"] for a in coco["annotations"])
    coco["annotations"] += [{"id": top + k, "image_id": 1 + k % 40, "category_id": 1, "iscrowd": 0, "area": 0,
                             "bbox": [0, 0, 0, 4]} for k in range(1, 81)]
    result = health([("val", "instances", coco, None, None)], shard_size=3)
    count, ids = found(result)["degenerate_bbox"]
    # image order: image 1 holds top+40 and top+80, image 2 top+1 and top+41, ...
    assert count == 80 and ids == [top + 40, top + 80] + [top + k + d for k in range(1, 25) for d in (0, 40)]
