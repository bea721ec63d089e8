"""`segpipe review`: the CVAT and Label Studio exports, each CVAT importer rule, a simulated review read back."""

import io
import json

import numpy as np
import pytest
from PIL import Image
from typer.testing import CliRunner

from pipeline.cli import app
from pipeline.errors import SegpipeError
from pipeline.filtering import FilterRules, Thresholds, run
from pipeline.io.tables import write_predictions
from pipeline.review import ls_rle_decode, ls_rle_encode
from pipeline.structures import ImagePrediction, Rle, Segment

runner = CliRunner()
H, W = 32, 40  # not square, so a transposed mask cannot pass
CATEGORIES = [{"id": 7, "name": "car", "isthing": 1, "color": [255, 0, 0]},
              {"id": 8, "name": "dog", "isthing": 1, "color": [0, 255, 0]},
              {"id": 9, "name": "kite", "isthing": 1, "color": [0, 0, 255]}]  # 9: no candidate has it


def _mask(y0, y1, x0, x1):
    mask = np.zeros((H, W), bool)
    mask[y0:y1, x0:x1] = True
    return mask


def _segment(id, category, mask, score, stability=0.99):
    return Segment.from_mask(id, category, mask, score, stability=stability)


# image id -> (file name, segments); with --min-score 0.5 --min-stability 0.9 --margin 0.1:
POOL = {
    1: ("plain.png", (_segment(1, 7, _mask(0, 8, 0, 10), 0.9),  # kept
                      _segment(2, 8, _mask(10, 20, 0, 10), 0.45),  # borderline: score
                      _segment(3, 7, _mask(20, 30, 0, 10), 0.1),  # far below: not exported
                      _segment(4, 7, _mask(0, 8, 20, 30), 0.9, stability=0.85),  # borderline: stability
                      _segment(5, 8, np.zeros((H, W), bool), 0.45))),  # borderline, but an empty mask
    2: ("a.jpg.png", (_segment(1, 8, _mask(0, 10, 0, 10), 0.48), _segment(2, 7, _mask(10, 20, 10, 30), 0.95))),
    3: ("x.jpg", (_segment(1, 7, _mask(5, 15, 5, 15), 0.42),)),
    4: ("x.png", (_segment(1, 7, _mask(5, 15, 5, 15), 0.41),)),
    5: ("quiet.png", (_segment(1, 7, _mask(0, 5, 0, 5), 0.99),)),  # nothing doubtful
}


def _png(seed):
    buffer = io.BytesIO()
    Image.fromarray(np.random.default_rng(seed).integers(0, 255, (H, W, 3), np.uint8)).save(buffer, "PNG")
    return buffer.getvalue()


@pytest.fixture
def filtered(tmp_path):
    """A pool of images, its infer output (every candidate) and a `segpipe filter` output of it."""
    (tmp_path / "pool").mkdir()
    for image_id, (name, _) in POOL.items():
        (tmp_path / "pool" / name).write_bytes(_png(image_id))
    infer = tmp_path / "infer"
    (infer / "predictions").mkdir(parents=True)
    (infer / "run.json").write_text(json.dumps({"input": str(tmp_path / "pool"), "run_id": "r1", "model": "m1"}))
    (infer / "categories.json").write_text(json.dumps(CATEGORIES))
    write_predictions(str(infer / "predictions" / "part-00000.parquet"),
                      [ImagePrediction(i, name, H, W, segments) for i, (name, segments) in POOL.items()], "r1", "m1")
    run(str(infer), str(tmp_path / "filter"), FilterRules(Thresholds(min_score=0.5, min_stability=0.9), {}, None))
    return tmp_path / "filter"


def _export(filtered, out, *options):
    result = runner.invoke(app, ["review", "export", "--filtered", str(filtered), "--out", str(out), *options])
    assert result.exit_code == 0, result.output
    return result


def _original(image_id, segment_id):
    return next(s for s in POOL[image_id][1] if s.id == segment_id).rle.to_mask()


@pytest.fixture
def exported(filtered, tmp_path):
    out = tmp_path / "review"
    result = _export(filtered, out)
    assert "exported 4 images: 5 borderline and 2 kept masks (1 empty masks left out)" in result.output
    return out


def _manifest(out):
    return json.loads((out / "review-export.json").read_text())


def test_the_most_doubtful_images_are_exported_with_their_borderline_and_kept_masks(exported):
    manifest = _manifest(exported)
    # Image 1 has three borderline candidates (one empty), the others one; image 5 none; ties by image id.
    assert [(im["image_id"], im["doubt"]) for im in manifest["images"]] == [(1, 3), (2, 1), (3, 1), (4, 1)]
    assert [(s["segment_id"], s["origin"]) for s in manifest["images"][0]["segments"]] == [
        (1, "kept"), (2, "borderline"), (4, "borderline")]
    assert manifest["masks"] == {"borderline": 5, "kept": 2, "empty_left_out": 1}


def test_no_prefill_exports_the_borderline_masks_only(filtered, tmp_path):
    _export(filtered, tmp_path / "r", "--no-prefill", "--images", "1", "--format", "cvat")
    manifest = _manifest(tmp_path / "r")
    assert [s["segment_id"] for im in manifest["images"] for s in im["segments"]] == [2, 4]
    assert not (tmp_path / "r" / "label-studio").exists()


def test_the_cvat_file_loads_in_pycocotools_with_the_original_masks(exported):
    from pycocotools.coco import COCO

    coco = COCO(str(exported / "cvat" / "instances.json"))
    manifest = _manifest(exported)
    exported_masks = [(im["image_id"], s["segment_id"]) for im in manifest["images"] for s in im["segments"]]
    annotations = coco.loadAnns(coco.getAnnIds())
    assert len(annotations) == len(exported_masks) == 7
    for annotation, (image_id, segment_id) in zip(annotations, exported_masks):
        assert annotation["image_id"] == image_id and annotation["iscrowd"] == 1  # RLE + crowd: a CVAT mask
        assert isinstance(annotation["segmentation"]["counts"], str)
        assert np.array_equal(coco.annToMask(annotation).astype(bool), _original(image_id, segment_id))
        assert annotation["area"] == _original(image_id, segment_id).sum()


def test_cvat_rule_every_category_is_a_label_of_the_task(exported):
    coco = json.loads((exported / "cvat" / "instances.json").read_text())
    labels = json.loads((exported / "cvat" / "labels.json").read_text())
    assert [c["name"] for c in coco["categories"]] == ["car", "dog", "kite"]  # kite: unused, a reviewer may add one
    assert labels == [{"name": "car", "type": "any", "attributes": [], "color": "#ff0000"},
                      {"name": "dog", "type": "any", "attributes": [], "color": "#00ff00"},
                      {"name": "kite", "type": "any", "attributes": [], "color": "#0000ff"}]


def test_cvat_rule_file_names_are_the_frames_uploaded(exported, tmp_path):
    coco = json.loads((exported / "cvat" / "instances.json").read_text())
    frames = (exported / "images.txt").read_text().splitlines()
    assert [im["file_name"] for im in coco["images"]] == frames
    assert sorted(p.name for p in (exported / "images").iterdir()) == sorted(frames)
    names = {im["frame"]: im["file_name"] for im in _manifest(exported)["images"]}
    for frame, name in names.items():  # the very bytes of the pool's image
        assert (exported / "images" / frame).read_bytes() == (tmp_path / "pool" / name).read_bytes()


def test_cvat_rule_no_name_has_two_extensions_or_a_shared_stem(exported):
    import posixpath

    frames = {im["file_name"]: im["frame"] for im in _manifest(exported)["images"]}
    # a.jpg.png would be matched as 'a.jpg'; x.jpg and x.png are one item 'x' to CVAT's importer.
    assert frames == {"plain.png": "plain.png", "a.jpg.png": "a_jpg.png", "x.jpg": "x-3.jpg", "x.png": "x-4.png"}
    stems = [posixpath.splitext(f)[0] for f in frames.values()]
    assert len(set(stems)) == len(stems) and not any("." in s for s in stems)


def test_cvat_rule_empty_masks_are_counted_not_exported(exported):
    coco = json.loads((exported / "cvat" / "instances.json").read_text())
    assert min(a["area"] for a in coco["annotations"]) > 0
    exported_ids = {(im["image_id"], s["segment_id"]) for im in _manifest(exported)["images"] for s in im["segments"]}
    assert (1, 5) not in exported_ids and _manifest(exported)["masks"]["empty_left_out"] == 1


def test_cvat_rule_category_id_0_is_refused(filtered, tmp_path):
    categories = json.loads((filtered / "categories.json").read_text())
    (filtered / "categories.json").write_text(json.dumps([{"id": 0, "name": "thing"}, *categories]))
    _one_line(runner.invoke(app, ["review", "export", "--filtered", str(filtered), "--out", str(tmp_path / "r")]),
              "category id 0; CVAT's COCO importer reads it as 'no label'")


def test_label_studio_masks_decode_with_its_own_converter(exported):
    from label_studio_converter.brush import decode_rle

    tasks = json.loads((exported / "label-studio" / "tasks.json").read_text())
    manifest = _manifest(exported)
    assert [t["data"]["frame"] for t in tasks] == [im["frame"] for im in manifest["images"]]  # most doubtful first
    assert tasks[0]["data"]["image"] == "/data/local-files/?d=plain.png" and tasks[0]["data"]["doubt"] == 3
    for task, image in zip(tasks, manifest["images"]):
        prediction = task["predictions"][0]
        assert prediction["model_version"] == "m1"
        assert prediction["score"] == pytest.approx(np.mean([s["score"] for s in image["segments"]]))
        for result, s in zip(prediction["result"], image["segments"]):
            assert (result["type"], result["value"]["format"], result["score"]) == ("brushlabels", "rle", s["score"])
            assert result["value"]["brushlabels"] == [{7: "car", 8: "dog"}[s["category_id"]]]
            rgba = decode_rle(result["value"]["rle"]).reshape(H, W, 4)
            assert np.array_equal(rgba[..., 3] == 255, _original(image["image_id"], s["segment_id"]))
            assert set(np.unique(rgba)) <= {0, 255}
    config = (exported / "label-studio" / "config.xml").read_text()
    assert all(f'<Label value="{c["name"]}"/>' in config for c in CATEGORIES)


def test_label_studio_rle_splits_runs_longer_than_its_longest_length():
    from label_studio_converter.brush import decode_rle

    mask = np.zeros((300, 500), bool)
    mask[100:250, 10:490] = True  # one row is 1,920 bytes; the background before it 200,040 (> 2^16)
    mask[5, 7] = True
    encoded = ls_rle_encode(mask)
    assert np.array_equal(decode_rle(encoded).reshape(300, 500, 4)[..., 3] == 255, mask)
    assert np.array_equal(ls_rle_decode(encoded, 300, 500), mask)


# --- a simulated review --------------------------------------------------------------------------


def _shift(rle_counts, dx):
    return np.roll(Rle(rle_counts, H, W).to_mask(), dx, axis=1)


def _coco_annotation(annotation_id, image_id, category_id, mask):
    rle = Rle.from_mask(mask)
    return {"id": annotation_id, "image_id": image_id, "category_id": category_id, "segmentation": rle.to_coco(),
            "area": rle.area(), "bbox": list(rle.bbox()), "iscrowd": 1}


KITE = [30, 20, 40, 20, 40, 30, 30, 30]


def _cvat_review(exported, path):
    """What a reviewer does in CVAT, then its COCO 1.0 export: CVAT numbers images and labels its own way."""
    coco = json.loads((exported / "cvat" / "instances.json").read_text())
    image_ids = {im["id"]: k + 1 for k, im in enumerate(coco["images"])}
    label_ids = {c["id"]: k + 1 for k, c in enumerate(coco["categories"])}
    kept = []
    for a in coco["annotations"]:
        image, counts = a["image_id"], a["segmentation"]["counts"]
        if image == 1 and a["category_id"] == 8:  # image 1's dog: deleted
            continue
        if image == 1 and a["category_id"] == 7 and a["bbox"][0] == 20:  # image 1's unstable car: moved 3 px right
            a = _coco_annotation(a["id"], image, 7, _shift(counts, 3))
        if image == 3:  # relabelled car -> dog
            a = {**a, "category_id": 8}
        kept.append(a)
    kept.append({"id": 100, "image_id": 4, "category_id": 9, "segmentation": [KITE], "area": 100.0,
                 "bbox": [30.0, 20.0, 10.0, 10.0], "iscrowd": 0})  # a kite nobody had found, drawn as a polygon
    kept.append(_coco_annotation(101, 2, 7, _mask(25, 30, 0, 5)))  # and a car
    for a in kept:
        a["image_id"], a["category_id"] = image_ids[a["image_id"]], label_ids[a["category_id"]]
    coco["annotations"] = kept
    coco["images"] = [{**im, "id": image_ids[im["id"]]} for im in coco["images"]]
    coco["categories"] = [{**c, "id": label_ids[c["id"]]} for c in coco["categories"]]
    path.write_text(json.dumps(coco))
    return path


def test_a_cvat_review_imports_with_the_right_counts_as_training_labels(exported, tmp_path):
    from pipeline.train.data import check_images, decode, load_dataset, read_encoded

    corrected = _cvat_review(exported, tmp_path / "instances_default.json")
    result = runner.invoke(app, ["review", "import", "--export", str(exported), "--corrected", str(corrected),
                                 "--out", str(tmp_path / "labels")])
    assert result.exit_code == 0, result.output
    summary = json.loads((tmp_path / "labels" / "review.json").read_text())
    # 7 exported: image 1 kept car accepted, dog deleted, unstable car moved (IoU 0.54: changed); image 2 both
    # accepted; image 3 relabelled (changed); image 4 accepted. Added: the kite and the car.
    assert {k: summary[k] for k in ("images", "exported_masks", "accepted", "changed", "deleted", "added",
                                    "returned_masks")} == {"images": 4, "exported_masks": 7, "accepted": 4,
                                                           "changed": 2, "deleted": 1, "added": 2,
                                                           "returned_masks": 8}
    assert summary["by_origin"] == {"kept": {"accepted": 2, "changed": 0, "deleted": 0},
                                    "borderline": {"accepted": 2, "changed": 2, "deleted": 1}}
    assert summary["ratios"] == {"accepted": 4 / 7, "changed": 2 / 7, "deleted": 1 / 7, "added": 2 / 8}
    assert "4 images reviewed: of 7 exported masks 4 accepted (0.57), 2 changed (0.29), 1 deleted (0.14); 2 added" \
        in result.output
    # The next round's training reads the folder: the reviewed masks, by the pool's names and ids.
    dataset = load_dataset(str(tmp_path / "labels"))
    check_images(dataset)
    assert dataset.images == str(tmp_path / "pool") and [c["id"] for c in dataset.categories] == [7, 8, 9]
    example = next(e for e in dataset.examples if e.image_id == 4)
    sample = decode(dataset, example, *read_encoded(dataset, [example])[0])
    assert example.file_name == "x.png" and [s["category_id"] for s in sample.segments] == [7, 9]
    assert np.array_equal(sample.ids == 2, Rle.from_coco([KITE], H, W).to_mask())
    assert np.array_equal(sample.ids == 1, _original(4, 1))
    three = next(e for e in dataset.examples if e.image_id == 3)
    assert [s["category_id"] for s in three.segments] == [8]


def test_a_label_studio_review_imports_with_the_right_counts(exported, tmp_path):
    tasks = json.loads((exported / "label-studio" / "tasks.json").read_text())
    for task in tasks:  # Label Studio's export: the reviewer's annotation beside the prediction
        results = [dict(r) for r in task["predictions"][0]["result"]]
        frame = task["data"]["frame"]
        if frame == "plain.png":
            results = [r for r in results if r["value"]["brushlabels"] != ["dog"]]  # deleted
        if frame == "a_jpg.png":
            moved = results[1]
            mask = np.roll(ls_rle_decode(moved["value"]["rle"], H, W), 2, axis=0)
            results[1] = {**moved, "value": {**moved["value"], "rle": ls_rle_encode(mask)}}
            results.append({"id": "new", "type": "polygonlabels", "from_name": "polygon", "to_name": "image",
                            "original_width": W, "original_height": H,
                            "value": {"points": [[75, 75], [100, 75], [100, 100], [75, 100]],
                                      "polygonlabels": ["kite"]}})
        task["annotations"] = [] if frame == "x-4.png" else [
            {"id": 1, "result": [], "was_cancelled": True, "updated_at": "2030-01-01"},
            {"id": 2, "result": results, "was_cancelled": False, "updated_at": "2025-01-01"}]
    (tmp_path / "ls.json").write_text(json.dumps(tasks))
    result = runner.invoke(app, ["review", "import", "--export", str(exported), "--corrected",
                                 str(tmp_path / "ls.json"), "--out", str(tmp_path / "labels")])
    assert result.exit_code == 0, result.output
    summary = json.loads((tmp_path / "labels" / "review.json").read_text())
    # x.png was never annotated: not reviewed, not counted. Of the other 6: the dog deleted, image 2's car moved
    # 2 rows (IoU 8/12: changed), 4 accepted; the polygon kite added.
    assert {k: summary[k] for k in ("images", "exported_masks", "accepted", "changed", "deleted", "added")} == {
        "images": 3, "exported_masks": 6, "accepted": 4, "changed": 1, "deleted": 1, "added": 1}


def test_the_matching_is_greedy_one_to_one_by_iou():
    from pipeline.review import Returned, match

    a, b = _mask(0, 10, 0, 10), _mask(0, 10, 2, 12)  # IoU 80/120
    image = {"height": H, "width": W, "segments": [
        {"category_id": 7, "origin": "kept", "rle": Rle.from_mask(a).counts},
        {"category_id": 7, "origin": "borderline", "rle": Rle.from_mask(b).counts}]}
    # One returned mask equal to b: it pairs with b (IoU 1), not a; a is deleted.
    assert match(image, [Returned(7, Rle.from_mask(b))]) == [("accepted", "borderline"), ("deleted", "kept")]
    # The same mask relabelled: changed; a mask overlapping nothing enough: added.
    assert match(image, [Returned(8, Rle.from_mask(a)), Returned(7, Rle.from_mask(_mask(20, 30, 20, 30)))]) == [
        ("changed", "kept"), ("deleted", "borderline"), ("added", None)]


# --- bad input: one line each --------------------------------------------------------------------


def _one_line(result, message):
    assert result.exit_code == 2 and message in result.stderr and result.stderr.count("\n") == 1, result.output


def test_an_export_of_images_not_in_the_pool_is_one_line(filtered, tmp_path):
    result = runner.invoke(app, ["review", "export", "--filtered", str(filtered), "--out", str(tmp_path / "r"),
                                 "--image", "plain.png", "--image", "elsewhere.jpg"])
    _one_line(result, "--image 'elsewhere.jpg': not in the pool")
    named = _export(filtered, tmp_path / "n", "--image", "quiet.png", "--image", "2")
    assert [im["image_id"] for im in _manifest(tmp_path / "n")["images"]] == [2, 5] and "exported 2 images" in named.output
    _one_line(runner.invoke(app, ["review", "export", "--filtered", str(tmp_path), "--out", str(tmp_path / "r")]),
              "not a `segpipe filter` output folder")


def test_an_import_with_an_unknown_image_or_category_is_one_line(exported, tmp_path):
    coco = json.loads(_cvat_review(exported, tmp_path / "c.json").read_text())
    for edit, message in (
        (lambda c: c["images"][1].update(file_name="stranger.png"), "image 'stranger.png' is not in the export"),
        (lambda c: c["categories"][2].update(name="zebra"), "category 'zebra' is not one of the export's categories"),
        (lambda c: c["annotations"][0].update(category_id=42), "unknown category_id 42"),  # validate's
    ):
        bad = json.loads(json.dumps(coco))
        edit(bad)
        (tmp_path / "bad.json").write_text(json.dumps(bad))
        _one_line(runner.invoke(app, ["review", "import", "--export", str(exported), "--corrected",
                                      str(tmp_path / "bad.json"), "--out", str(tmp_path / "x")]), message)
    tasks = json.loads((exported / "label-studio" / "tasks.json").read_text())
    tasks[0]["data"] = {"image": "/data/upload/3/other.jpg"}
    (tmp_path / "ls.json").write_text(json.dumps(tasks))
    _one_line(runner.invoke(app, ["review", "import", "--export", str(exported), "--corrected",
                                  str(tmp_path / "ls.json"), "--out", str(tmp_path / "x")]),
              "image '/data/upload/3/other.jpg' is not in the export")


def test_an_unchanged_review_of_a_synthetic_pool_in_tar_shards_is_all_accepted(dataset, tmp_path):
    """Candidates from the synthetic labels (scores spread over [0.3, 0.7)), images read from tar shards."""
    from pipeline.train.data import check_images, load_dataset

    coco = json.loads((dataset / "annotations" / "instances_val.json").read_text())
    infer = tmp_path / "infer"
    (infer / "predictions").mkdir(parents=True)
    (infer / "run.json").write_text(json.dumps({"input": str(dataset / "shards"), "run_id": "s", "model": "m"}))
    (infer / "categories.json").write_text(json.dumps(coco["categories"]))
    predictions = []
    for image in coco["images"]:
        annotations = [a for a in coco["annotations"] if a["image_id"] == image["id"] and not a["iscrowd"]]
        predictions.append(ImagePrediction(image["id"], image["file_name"], image["height"], image["width"], tuple(
            Segment.from_rle(k + 1, a["category_id"], Rle.from_coco(a["segmentation"], image["height"], image["width"]),
                             score=0.3 + 0.4 * ((a["id"] * 7) % 10) / 10, stability=0.99)
            for k, a in enumerate(annotations))))
    write_predictions(str(infer / "predictions" / "part-00000.parquet"), predictions, "s", "m")
    run(str(infer), str(tmp_path / "filter"), FilterRules(Thresholds(min_score=0.5), {}, None))
    _export(tmp_path / "filter", tmp_path / "review", "--images", "3", "--format", "cvat")
    manifest = _manifest(tmp_path / "review")
    shown = sum(len(im["segments"]) for im in manifest["images"])
    result = runner.invoke(app, ["review", "import", "--export", str(tmp_path / "review"), "--corrected",
                                 str(tmp_path / "review" / "cvat" / "instances.json"), "--out", str(tmp_path / "labels")])
    assert result.exit_code == 0, result.output
    summary = json.loads((tmp_path / "labels" / "review.json").read_text())
    assert len(manifest["images"]) == 3 and shown > 3
    assert (summary["accepted"], summary["changed"], summary["deleted"], summary["added"]) == (shown, 0, 0, 0)
    check_images(load_dataset(str(tmp_path / "labels")))  # every labelled image is in the shards


def test_a_label_studio_polygon_of_fewer_than_3_points_is_one_line():
    from pipeline.review import _ls_mask

    image = {"frame": "a.png", "height": 10, "width": 10}
    for points in ([[10, 20], [30, 40]], [[10, 20], [30, 40], [50, 60]][:1], None):
        result = {"id": "r", "type": "polygonlabels", "value": {"polygonlabels": ["car"], **({"points": points} if points else {})}}
        with pytest.raises(SegpipeError, match="r': a polygon needs at least 3 points"):
            _ls_mask(result, image, "export.json")
