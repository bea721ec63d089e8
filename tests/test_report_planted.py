"""`segpipe report` end to end on 40 synthetic images with planted problems (a missing label, a swapped class, a
duplicate image, an image leaked into another split, a broken mask, a box that disagrees with its mask): report.json
names each of them, exactly, and says nothing about the same data without them."""

import json
import shutil

import pytest
from typer.testing import CliRunner

from pipeline.cli import app
from pipeline.structures import Rle
from pipeline.synth import SynthConfig, write_dataset

runner = CliRunner()
SIZE = 96  # 40 images of this size give every synth category at least 10 instances (the distribution is clean)


@pytest.fixture(scope="module")
def clean(tmp_path_factory):
    root = tmp_path_factory.mktemp("planted")
    for split, seed in (("val", 7), ("train", 8)):
        write_dataset(str(root), SynthConfig(images=40, split=split, seed=seed, height=SIZE, width=SIZE))
    coco = json.loads((root / "annotations" / "instances_val.json").read_text())
    # The model: the clean labels themselves, confident (every label right, so every finding below is a plant).
    results = [{"image_id": a["image_id"], "category_id": a["category_id"], "score": 0.9,
                "segmentation": Rle.from_coco(a["segmentation"], *_size(coco, a["image_id"])).to_coco()}
               for a in coco["annotations"] if not a["iscrowd"]]
    (root / "results.json").write_text(json.dumps(results))
    return root


def _size(coco, image_id):
    image = next(im for im in coco["images"] if im["id"] == image_id)
    return image["height"], image["width"]


def _report(root, gt, out):
    result = runner.invoke(app, ["report", "--dataset", str(gt), "--pred", str(root / "results.json"),
                                 "--leakage-with", str(root / "annotations" / "instances_train.json"),
                                 "--out", str(out), "--shard-size", "16", "--resamples", "50"])
    assert result.exit_code == 0, result.output
    return json.loads((out / "report.json").read_text())


def test_a_clean_set_gives_no_finding_and_no_candidate(clean, tmp_path):
    data = _report(clean, clean / "annotations" / "instances_val.json", tmp_path / "report")
    assert data["health"]["findings"] == [] and len(data["health"]["checked"]) > 20
    assert data["errors"]["candidates"] == [] and data["errors"]["tide"]["counts"]["Miss"] == 0


def test_every_planted_problem_is_found(clean, tmp_path):
    root = tmp_path / "data"
    shutil.copytree(clean, root)
    path = root / "annotations" / "instances_val.json"
    coco = json.loads(path.read_text())
    things = [a for a in coco["annotations"] if not a["iscrowd"]]
    missing, swapped, broken, boxed = things[0], things[5], things[10], things[15]
    other = next(c["id"] for c in coco["categories"] if c["id"] != swapped["category_id"])
    coco["annotations"].remove(missing)  # a missing label: the model's confident segment there has no label
    swapped["category_id"] = other  # a swapped class
    broken["segmentation"] = {"size": [SIZE, SIZE], "counts": "not an RLE"}  # a broken mask
    boxed["bbox"] = [boxed["bbox"][0] + 5, *boxed["bbox"][1:]]  # a box that disagrees with its mask
    # A duplicate image: image 3's file again under another name and id (with no labels).
    first = next(im for im in coco["images"] if im["id"] == 3)
    shutil.copy(root / "val" / first["file_name"], root / "val" / "copy.jpg")
    coco["images"].append({**first, "id": 1000, "file_name": "copy.jpg"})
    path.write_text(json.dumps(coco))
    # An image leaked into the other split: val's image 7 also in train, as train's image 2000.
    train = json.loads((root / "annotations" / "instances_train.json").read_text())
    leaked = next(im for im in coco["images"] if im["id"] == 7)
    shutil.copy(root / "val" / leaked["file_name"], root / "train" / "leaked.jpg")
    train["images"].append({**leaked, "id": 2000, "file_name": "leaked.jpg"})
    (root / "annotations" / "instances_train.json").write_text(json.dumps(train))
    (root / "results.json").write_text(json.dumps(json.loads((clean / "results.json").read_text())))

    data = _report(root, path, tmp_path / "report")
    found = {f["check"]: (f["count"], f["ids"]) for f in data["health"]["findings"]}
    assert found.pop("broken_mask") == (1, [broken["id"]])
    assert found.pop("box_mask_mismatch") == (1, [boxed["id"]])
    assert found.pop("duplicate_image") == (1, [[3, 1000]])
    assert found.pop("leaked_image") == (1, [[["val", 7], ["train", 2000]]])
    assert found == {}, found  # nothing else
    kinds = {(c["kind"], c["image_id"]) for c in data["errors"]["candidates"]}
    assert ("missing_annotation", missing["image_id"]) in kinds
    wrong = [c for c in data["errors"]["candidates"] if c["kind"] == "wrong_label"]
    assert [(c["image_id"], c["gt_category_id"], c["pred_category_id"]) for c in wrong] == [
        (swapped["image_id"], other, swapped_original(clean, swapped))]
    coco_out = json.loads((tmp_path / "report" / "label-errors.json").read_text())
    assert {a["label_error"]["kind"] for a in coco_out["annotations"]} >= {"missing_annotation", "wrong_label"}


def swapped_original(root, annotation):
    coco = json.loads((root / "annotations" / "instances_val.json").read_text())
    return next(a["category_id"] for a in coco["annotations"] if a["id"] == annotation["id"])


def test_leakage_with_the_same_split_is_one_line(clean, tmp_path):
    gt = str(clean / "annotations" / "instances_val.json")
    result = runner.invoke(app, ["report", "--dataset", gt, "--leakage-with", gt, "--out", str(tmp_path / "r")])
    assert result.exit_code == 2 and "names the split 'val' again" in result.stderr
    assert result.stderr.count("\n") == 1, result.output
