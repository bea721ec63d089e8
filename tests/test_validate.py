"""`segpipe validate`: each problem real datasets have, found on a broken copy, one line each."""

import copy
import json
import shutil
import subprocess
import sys

import pytest
from PIL import Image
from typer.testing import CliRunner

from pipeline.cli import app
from pipeline.validate import validate

runner = CliRunner()


@pytest.fixture
def broken(dataset, tmp_path):
    """A writable copy of the dataset, and a helper that rewrites one of its JSON files."""
    root = tmp_path / "copy"
    shutil.copytree(dataset, root)

    def rewrite(name: str, change) -> str:
        path = root / "annotations" / f"{name}_val.json"
        data = json.loads(path.read_text())
        change(data)
        path.write_text(json.dumps(data))
        return str(path)

    return root, rewrite


def _messages(path: str, **kwargs) -> list[str]:
    return [str(p) for p in validate(path, **kwargs).problems]


def test_synthetic_dataset_is_valid(dataset):
    for name in ("panoptic", "instances"):
        report = validate(str(dataset / "annotations" / f"{name}_val.json"), images_folder=str(dataset / "val"))
        assert (report.kind, report.images, report.problems) == (name, 12, [])


def _first_thing(data):
    annotation = data["annotations"][0]
    things = {c["id"] for c in data["categories"] if c["isthing"]}
    return annotation, next(s for s in annotation["segments_info"] if s["category_id"] in things)


PANOPTIC_CASES = {
    "segment in the PNG is not in segments_info": lambda d: _first_thing(d)[0]["segments_info"].remove(_first_thing(d)[1]),
    "segment in segments_info has no pixels in the PNG": lambda d: d["annotations"][0]["segments_info"].append(
        {"id": 12345, "category_id": 1, "iscrowd": 0, "area": 5, "bbox": [0, 0, 1, 1]}),
    "duplicate segment id": lambda d: d["annotations"][0]["segments_info"].append(copy.deepcopy(_first_thing(d)[1])),
    "unknown category_id 9999": lambda d: _first_thing(d)[1].update(category_id=9999),
    "disagrees with the PNG's": lambda d: _first_thing(d)[1].update(area=_first_thing(d)[1]["area"] + 1),
    "bbox [0, 0, 1, 1] disagrees with the PNG's box": lambda d: _first_thing(d)[1].update(bbox=[0, 0, 1, 1]),
    "PNG is 256x256 (HxW), the image is 300x256": lambda d: d["images"][0].update(height=300),
    "file_name '../../etc/passwd' escapes its folder": lambda d: d["images"][0].update(file_name="../../etc/passwd"),
    "file_name '../panoptic_val/000000000001.png' escapes its folder":
        lambda d: d["annotations"][0].update(file_name="../panoptic_val/000000000001.png"),
    "segment id 0 is not in 1..16777215 (0 is VOID)": lambda d: _first_thing(d)[1].update(id=0),
    "image has no panoptic annotation": lambda d: d["annotations"].pop(0),
    "annotation's image_id is not in 'images'": lambda d: d["annotations"][0].update(image_id=999),
    "duplicate image id": lambda d: d["images"].append(copy.deepcopy(d["images"][0])),
    "has 'isthing' None, expected 0 or 1": lambda d: d["categories"][0].pop("isthing"),
}


@pytest.mark.parametrize("expected", list(PANOPTIC_CASES))
def test_each_panoptic_problem_is_one_line_naming_file_image_and_segment(broken, expected):
    root, rewrite = broken
    path = rewrite("panoptic", PANOPTIC_CASES[expected])
    messages = _messages(path)
    assert any(expected in m for m in messages), messages
    assert all(m.startswith(path + ": ") and "\n" not in m for m in messages)
    if "segment" in expected and "image" not in expected:
        assert any(m.startswith(f"{path}: image 1: segment ") for m in messages), messages


def test_png_that_is_missing_or_not_a_panoptic_png(broken):
    root, rewrite = broken
    folder = root / "annotations" / "panoptic_val"
    (folder / "000000000001.png").unlink()
    Image.new("L", (256, 256)).save(folder / "000000000002.png")
    (folder / "000000000003.png").write_bytes(b"\x89PNG\r\n\x1a\n truncated")
    messages = _messages(rewrite("panoptic", lambda d: None))
    assert any("image 1: " in m and "000000000001.png: no such file" in m for m in messages)
    assert any("image 2: " in m and "is a 8-bit grayscale PNG; a COCO panoptic PNG is 8-bit RGB" in m for m in messages)
    assert any("image 3: " in m and "cannot be read as a PNG" in m for m in messages)
    assert len(messages) == 3


def _instance(data, kind):
    def matches(a):
        s = a["segmentation"]
        return {"polygons": isinstance(s, list), "crowd": isinstance(s, dict) and isinstance(s["counts"], list),
                "rle": isinstance(s, dict) and isinstance(s["counts"], str)}[kind]
    return next(a for a in data["annotations"] if matches(a))


INSTANCE_CASES = {
    "malformed RLE: character": lambda d: _instance(d, "rle")["segmentation"].update(counts="ab\x01cd"),
    "malformed RLE: runs add up to": lambda d: _instance(d, "rle")["segmentation"].update(counts="0"),
    "malformed RLE: counts add up to 65537": lambda d: _instance(d, "crowd")["segmentation"]["counts"].append(1),
    "RLE size [128, 256] differs from the image size [256, 256]":
        lambda d: _instance(d, "rle")["segmentation"].update(size=[128, 256]),
    "malformed polygon: 5 coordinates": lambda d: _instance(d, "polygons").update(segmentation=[[1, 2, 3, 4, 5]]),
    "malformed polygon: expected lists of numbers": lambda d: _instance(d, "polygons").update(segmentation=[["a"]]),
    "unknown category_id 187": lambda d: _instance(d, "rle").update(category_id=187),
    "duplicate annotation id": lambda d: d["annotations"].append(copy.deepcopy(d["annotations"][0])),
    "disagrees with the mask's": lambda d: _instance(d, "rle").update(area=_instance(d, "rle")["area"] * 2),
    "disagrees with the polygons": lambda d: _instance(d, "polygons").update(area=_instance(d, "polygons")["area"] * 2),
    "bbox [0, 0, 5, 5] disagrees": lambda d: _instance(d, "crowd").update(bbox=[0, 0, 5, 5]),
    "image_id is not in 'images'": lambda d: d["annotations"][0].update(image_id=4242),
}


@pytest.mark.parametrize("expected", list(INSTANCE_CASES))
def test_each_instances_problem_is_one_line_naming_file_image_and_annotation(broken, expected):
    root, rewrite = broken
    path = rewrite("instances", INSTANCE_CASES[expected])
    messages = _messages(path)
    assert any(expected in m for m in messages), messages
    assert all(m.startswith(path + ": image ") and ": annotation " in m for m in messages), messages


def test_image_sizes_are_checked_against_the_image_files(broken):
    root, rewrite = broken
    path = rewrite("instances", lambda d: d["images"][1].update(width=300))
    messages = _messages(path, images_folder=str(root / "val"))
    assert any(m.endswith("000000000002.jpg: image is 256x256 (HxW), the JSON says 256x300") for m in messages)


def test_cli_exit_codes_and_one_line_errors(broken, tmp_path):
    root, rewrite = broken
    good = str(root / "annotations" / "panoptic_val.json")
    result = runner.invoke(app, ["validate", good])
    assert result.exit_code == 0 and "COCO panoptic, 12 images, 12 annotations" in result.stderr
    bad = rewrite("instances", lambda d: _instance(d, "rle").update(category_id=187))
    result = runner.invoke(app, ["validate", bad])
    assert result.exit_code == 1 and "unknown category_id 187" in result.stdout and "1 problems" in result.stderr
    shutil.rmtree(root / "annotations" / "panoptic_val")
    result = runner.invoke(app, ["validate", good])
    assert result.exit_code == 2 and "panoptic_val: no such folder; the panoptic PNGs of" in result.stderr
    (tmp_path / "corrupt.json").write_text("{not json")
    (tmp_path / "list.json").write_text("[]")
    for path, message in [(tmp_path / "nope.json", "nope.json: no such file"),
                          (tmp_path / "corrupt.json", "corrupt.json: invalid JSON at line 1 column 2"),
                          (tmp_path / "list.json", "list.json: not a COCO file")]:
        result = runner.invoke(app, ["validate", str(path)])
        assert result.exit_code == 2
        assert result.stderr.startswith("segpipe: error: ") and message in result.stderr
        assert result.stderr.count("\n") == 1


def test_real_process_prints_no_traceback_for_bad_input(tmp_path):
    (tmp_path / "corrupt.json").write_text('{"annotations": ')
    for args, message in (
        (["validate", str(tmp_path / "corrupt.json")],
         f"segpipe: error: {tmp_path / 'corrupt.json'}: invalid JSON at line 1 column 17: unexpected end of data"),
        (["validate", str(tmp_path / "missing.json")], f"segpipe: error: {tmp_path / 'missing.json'}: no such file"),
        (["synth", str(tmp_path / "out"), "--images", "2", "--size", "12x4"],
         "Invalid value: '12x4': expected HEIGHTxWIDTH, each at least 16"),
    ):
        done = subprocess.run([sys.executable, "-m", "pipeline", *args], capture_output=True, text=True)
        assert done.returncode == 2, done
        assert "Traceback" not in done.stderr and message in done.stderr, done.stderr
    assert not (tmp_path / "out").exists()  # the bad size stopped synth before it wrote anything


# Annotation 1768 of COCO's instances_val2017.json, as published: its area is the polygon's
# shoelace area (702.10575) and its box the vertices' extent, not the rasterised pixels (703 px).
COCO_1768 = {"segmentation": [[
    510.66, 423.01, 511.72, 420.03, 510.45, 416.0, 510.34, 413.02, 510.77, 410.26, 510.77, 407.5, 510.34, 405.16,
    511.51, 402.83, 511.41, 400.49, 510.24, 398.16, 509.39, 397.31, 504.61, 399.22, 502.17, 399.64, 500.89, 401.66,
    500.47, 402.08, 499.09, 401.87, 495.79, 401.98, 490.59, 401.77, 488.79, 401.77, 485.39, 398.58, 483.9, 397.31,
    481.56, 396.35, 478.48, 395.93, 476.68, 396.03, 475.4, 396.77, 473.92, 398.79, 473.28, 399.96, 473.49, 401.87,
    474.56, 403.47, 473.07, 405.59, 473.39, 407.71, 476.68, 409.41, 479.23, 409.73, 481.56, 410.69, 480.4, 411.85,
    481.35, 414.93, 479.86, 418.65, 477.32, 420.03, 476.04, 422.58, 479.02, 422.58, 480.29, 423.01, 483.79, 419.93,
    486.66, 416.21, 490.06, 415.57, 492.18, 416.85, 491.65, 420.24, 492.82, 422.9, 493.56, 424.39, 496.43, 424.6,
    498.02, 423.01, 498.13, 421.31, 497.07, 420.03, 497.07, 415.15, 496.33, 414.51, 501.1, 411.96, 502.06, 411.32,
    503.02, 415.04, 503.33, 418.12, 501.1, 420.24, 498.98, 421.63, 500.47, 424.39, 505.03, 423.32, 506.2, 421.31,
    507.69, 419.5, 506.31, 423.32, 510.03, 423.01, 510.45, 423.01]],
    "area": 702.1057499999998, "iscrowd": 0, "image_id": 289343, "bbox": [473.07, 395.93, 38.65, 28.67],
    "category_id": 18, "id": 1768}


def _coco_file(tmp_path, annotations) -> str:
    path = tmp_path / "instances_real.json"
    path.write_text(json.dumps({
        "images": [{"id": 289343, "file_name": "000000289343.jpg", "height": 640, "width": 529}],
        "annotations": annotations, "categories": [{"id": 18, "name": "dog", "supercategory": "animal"}]}))
    return str(path)


def test_real_coco_polygon_annotation_passes_and_its_broken_copies_do_not(tmp_path):
    assert _messages(_coco_file(tmp_path, [COCO_1768])) == []
    doubled = {**COCO_1768, "area": 2 * COCO_1768["area"]}
    shifted = {**COCO_1768, "bbox": [480.0, 395.93, 38.65, 28.67]}
    messages = _messages(_coco_file(tmp_path, [doubled, {**shifted, "id": 2}]))
    assert len(messages) == 2
    assert "area 1404.2114999999997 disagrees with the polygons (703 pixels, polygon area 702.11)" in messages[0]
    assert "annotation 2: bbox [480.0, 395.93, 38.65, 28.67] disagrees with the polygons' box" in messages[1]


def test_detection_only_annotations_are_checked_by_their_box(tmp_path):
    box_only = {"id": 1, "image_id": 289343, "category_id": 18, "iscrowd": 0, "area": 400.0, "bbox": [0, 0, 20, 20]}
    assert _messages(_coco_file(tmp_path, [box_only])) == []
    assert "'bbox' is [0, 0, -1, 20]" in _messages(_coco_file(tmp_path, [{**box_only, "bbox": [0, 0, -1, 20]}]))[0]
