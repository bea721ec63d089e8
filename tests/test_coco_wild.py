"""COCO files as they come from the wild: pycocotools' numbers where it has them, else one line and exit 2.

Each test writes a small real-shaped file by hand. Where pycocotools crashes on a field that has one
obvious reading, the reference is pycocotools on the same file with that field written out.
"""

import contextlib
import copy
import io
import json
from dataclasses import replace

import numpy as np
import pytest
from pycocotools import mask as mask_utils
from pycocotools.coco import COCO
from pycocotools.cocoeval import COCOeval
from typer.testing import CliRunner

from pipeline.cli import app
from pipeline.evaluate.ap import evaluate_ap
from pipeline.io.tables import write_predictions
from pipeline.structures import ImagePrediction, Rle, Segment, encode_panoptic_png

runner = CliRunner()
SIZE = 40


def _square(x, y, side):
    return [[x, y, x + side, y, x + side, y + side, x, y + side]]


def _annotation(id, image_id, category_id, x, y, side):
    return {"id": id, "image_id": image_id, "category_id": category_id, "segmentation": _square(x, y, side),
            "area": float(side * side), "bbox": [x, y, side, side], "iscrowd": 0}


def _detection(image_id, category_id, x, y, side, score):
    return {"image_id": image_id, "category_id": category_id, "segmentation": _square(x, y, side),
            "bbox": [x, y, side, side], "score": score}


def _gt():
    """Two images, categories 7 and 90 (ids neither contiguous nor sorted in the file)."""
    return {"images": [{"id": i, "height": SIZE, "width": SIZE, "file_name": f"{i}.jpg"} for i in (1, 2)],
            "categories": [{"id": 90, "name": "b"}, {"id": 7, "name": "a"}],
            "annotations": [_annotation(1, 1, 7, 2, 2, 10), _annotation(2, 1, 90, 20, 20, 12),
                            _annotation(3, 2, 7, 5, 5, 8), _annotation(4, 2, 90, 22, 4, 14)]}


def _results():
    return [_detection(1, 7, 3, 2, 10, 0.9), _detection(1, 90, 20, 21, 12, 0.8), _detection(2, 7, 6, 5, 8, 0.7),
            _detection(2, 90, 25, 25, 5, 0.6), _detection(2, 90, 22, 5, 14, 0.5)]


def _gt_without(key):
    """The ground truth without `key` in any annotation, which pycocotools then fails on (KeyError)."""
    gt = _gt()
    for annotation in gt["annotations"]:
        del annotation[key]
    with pytest.raises(KeyError):
        _pycocotools(gt, _results())
    return gt


def _write(tmp_path, gt, results):
    gt_path, results_path = tmp_path / "instances.json", tmp_path / "results.json"
    gt_path.write_text(json.dumps(gt))
    results_path.write_text(json.dumps(results))
    return str(gt_path), str(results_path)


def _pycocotools(gt, results, iou_type="segm"):
    """COCOeval's 12 numbers on the files' contents (deep copies: loadRes writes into its input)."""
    with contextlib.redirect_stdout(io.StringIO()):
        coco = COCO()
        coco.dataset = copy.deepcopy(gt)
        coco.createIndex()
        evaluator = COCOeval(coco, coco.loadRes(copy.deepcopy(results)), iou_type)
        evaluator.evaluate()
        evaluator.accumulate()
        evaluator.summarize()
    return evaluator.stats


def _assert_equal(tmp_path, gt, results, reference_gt=None, reference_results=None, iou_type="segm", **options):
    """segpipe on (gt, results) gives pycocotools' 12 numbers on the reference files (default: the same)."""
    ours = evaluate_ap(*_write(tmp_path, gt, results), iou_type, **options)
    reference = _pycocotools(reference_gt or gt, reference_results or results, iou_type)
    assert max(reference) > 0  # something matched: the case is not trivially all -1 or 0
    np.testing.assert_allclose(ours["stats"], reference, rtol=0, atol=1e-9)
    return ours


def _refused(tmp_path, gt, results, *words, command=("eval", "ap"), options=(), files=None):
    """The CLI exits 2 with one line on stderr naming the file and the item (`files`: written already)."""
    gt_path, results_path = files or _write(tmp_path, gt, results)
    result = runner.invoke(app, [*command, "--gt", gt_path, "--pred", results_path, *options])
    assert result.exit_code == 2, result.output
    assert result.stderr.count("\n") == 1 and "Traceback" not in result.output, result.output
    for word in words:
        assert word in result.stderr, result.stderr
    return result.stderr


def _empty_rle():
    counts = mask_utils.encode(np.zeros((SIZE, SIZE), np.uint8, order="F"))["counts"].decode("ascii")
    return {"size": [SIZE, SIZE], "counts": counts}


def _compressed(result):
    """The result without its box, its polygons as compressed RLE."""
    segmentation = result["segmentation"]
    if isinstance(segmentation, list):
        segmentation = mask_utils.merge(mask_utils.frPyObjects(segmentation, SIZE, SIZE))
        segmentation = {"size": [SIZE, SIZE], "counts": segmentation["counts"].decode("ascii")}
    return {**{k: v for k, v in result.items() if k != "bbox"}, "segmentation": segmentation}


def _uncompressed(polygons):
    """The polygon's mask as uncompressed RLE (column-major run lengths, starting with zeros)."""
    mask = mask_utils.decode(mask_utils.merge(mask_utils.frPyObjects(polygons, SIZE, SIZE))).ravel(order="F")
    edges = np.flatnonzero(np.diff(np.r_[0, mask, 2 - mask[-1]]) != 0)  # runs alternate from a zero run
    return {"size": [SIZE, SIZE], "counts": np.diff(np.r_[0, edges]).tolist()}


# --- the points ------------------------------------------------------------------------


def test_empty_segmentation_reads_as_empty_mask_like_pycocotools(tmp_path):
    gt, results = _gt(), _results()
    gt["annotations"][3]["segmentation"] = []
    results[0]["segmentation"] = []
    with pytest.raises(IndexError):  # pycocotools' frPyObjects indexes the first polygon
        _pycocotools(gt, results)
    reference_gt, reference_results = copy.deepcopy(gt), copy.deepcopy(results)
    reference_gt["annotations"][3]["segmentation"] = _empty_rle()
    reference_results[0]["segmentation"] = _empty_rle()
    _assert_equal(tmp_path, gt, results, reference_gt, reference_results)
    # loadRes's mask branch (no boxes) takes compressed RLE only
    reference_masks = [_compressed(r) for r in reference_results]
    masks_only = [{**r, "segmentation": []} if r is reference_masks[0] else r for r in reference_masks]
    _assert_equal(tmp_path, gt, masks_only, reference_gt, reference_masks)


def test_ground_truth_where_every_segmentation_is_empty_is_one_line_for_segm(tmp_path):
    gt = _gt()
    for annotation in gt["annotations"]:
        annotation["segmentation"] = []  # a box dataset converted to COCO: mask AP would be 0 throughout
    _refused(tmp_path, gt, _results(), "instances.json: no annotation has a mask", "use --iou-type bbox")
    _assert_equal(tmp_path, gt, _results(), iou_type="bbox")


def test_duplicate_annotation_ids_are_refused_naming_the_ids(tmp_path):
    gt = _gt()
    gt["annotations"][1]["id"] = gt["annotations"][3]["id"] = 1
    # pycocotools scores a mix of the duplicates: other numbers than the same file with unique ids.
    assert not np.allclose(_pycocotools(gt, _results()), _pycocotools(_gt(), _results()))
    line = _refused(tmp_path, gt, _results(), "instances.json", "duplicate annotation ids 1")
    assert line.strip().endswith("duplicate annotation ids 1")


def test_unknown_category_detections_are_refused_or_dropped_like_pycocotools(tmp_path):
    results = [*_results(), _detection(1, 5, 2, 2, 10, 0.95), _detection(2, 5, 5, 5, 8, 0.3)]
    _refused(tmp_path, _gt(), results, "results.json", "unknown category_id 5", "--drop-unknown-categories")
    ours = _assert_equal(tmp_path, _gt(), results, drop_unknown_categories=True)
    assert ours["dropped_detections"] == 2
    result = runner.invoke(app, ["eval", "ap", *sum((["--" + k, v] for k, v in zip(("gt", "pred"), _write(
        tmp_path, _gt(), results))), []), "--drop-unknown-categories"])
    assert result.exit_code == 0 and "dropped 2 detections" in result.stderr, result.output


def test_unknown_categories_in_a_predictions_table_are_dropped_like_pycocotools(tmp_path):
    masks = {}
    for category, (x, y, side) in {7: (3, 2, 10), 90: (20, 21, 12), 5: (1, 1, 9)}.items():
        masks[category] = np.zeros((SIZE, SIZE), bool)
        masks[category][y:y + side, x:x + side] = True
    image = ImagePrediction(1, "1.jpg", SIZE, SIZE, tuple(
        Segment.from_mask(k + 1, category, mask, score=0.9 - 0.1 * k) for k, (category, mask) in enumerate(masks.items())))
    table = tmp_path / "table" / "part-0.parquet"
    write_predictions(str(table), [image], "run", "model")
    gt_path, _ = _write(tmp_path, _gt(), [])
    ours = evaluate_ap(gt_path, str(table.parent), "segm", drop_unknown_categories=True)
    assert ours["dropped_detections"] == 1
    np.testing.assert_allclose(ours["stats"], _pycocotools(_gt(), image.to_coco_results()), rtol=0, atol=1e-9)


def test_validate_reports_a_negative_image_height_in_one_line(tmp_path):
    gt = _gt()
    gt["images"][0]["height"] = -40
    path, _ = _write(tmp_path, gt, [])
    result = runner.invoke(app, ["validate", path])
    assert result.exit_code == 1 and "Traceback" not in result.output, result.output
    assert result.stdout.splitlines() == [f"{path}: image 1: 'height' is -40, expected a positive integer"]


def test_negative_image_height_is_refused_for_masks_and_scores_boxes_like_pycocotools(tmp_path):
    gt = _gt()
    gt["images"][0]["height"] = -40
    with pytest.raises(OverflowError):
        _pycocotools(gt, _results())
    _refused(tmp_path, gt, _results(), "instances.json: image 1: 'height' is -40")
    _assert_equal(tmp_path, gt, _results(), iou_type="bbox")


def test_segm_on_detection_only_ground_truth_is_one_line(tmp_path):
    gt = _gt_without("segmentation")
    _refused(tmp_path, gt, _results(), "instances.json: image 1: annotation 1: no 'segmentation'",
             "use --iou-type bbox")
    _assert_equal(tmp_path, gt, _results(), iou_type="bbox")


@pytest.mark.parametrize("gt_form", ["json", "table"])
@pytest.mark.parametrize("problem, words", [
    ("overlap", ["image 1", "segments overlap", "instance predictions", "eval ap"]),
    ("malformed", ["image 1: segment 2: malformed RLE (character ' ' at 1 is outside the RLE alphabet)"]),
    ("size", [f"image 1: segment 2: the RLE covers {SIZE * SIZE // 2} pixels, the image has {SIZE * SIZE}"]),
])
def test_pq_on_a_bad_predictions_table_is_one_line_naming_the_segment(tmp_path, gt_form, problem, words):
    """Against PNG ground truth a table's masks are laid out first; against a table both are swept image by
    image, checked as they are decoded: the same line either way."""
    ids = np.zeros((SIZE, SIZE), np.uint32)
    ids[:20], ids[20:] = 1, 2
    (tmp_path / "panoptic").mkdir()
    (tmp_path / "panoptic" / "1.png").write_bytes(encode_panoptic_png(ids))
    info = [{"id": i, "category_id": 7, "iscrowd": 0, "area": 800, "bbox": [0, 20 * (i - 1), SIZE, 20]} for i in (1, 2)]
    gt = {"images": [{"id": 1, "height": SIZE, "width": SIZE, "file_name": "1.jpg"}],
          "categories": [{"id": 7, "name": "a", "isthing": 1}],
          "annotations": [{"image_id": 1, "file_name": "1.png", "segments_info": info}]}
    (tmp_path / "panoptic.json").write_text(json.dumps(gt))
    first, second = np.zeros((SIZE, SIZE), bool), np.zeros((SIZE, SIZE), bool)
    first[:24], second[16:] = True, True  # an instance model's masks overlap
    segments = [Segment.from_mask(1, 7, first, 0.9), Segment.from_mask(2, 7, second, 0.8)]
    if problem == "malformed":
        segments[1] = replace(segments[1], rle=replace(segments[1].rle, counts="0 1"))
    if problem == "size":  # a mask of another size: half the pixels
        segments[1] = replace(segments[1], rle=Rle.from_mask(np.ones((SIZE // 2, SIZE), bool)))
    table = tmp_path / "instances" / "part-0.parquet"
    write_predictions(str(table), [ImagePrediction(1, "1.jpg", SIZE, SIZE, tuple(segments))], "run", "maskrcnn")
    gt_path = tmp_path / "panoptic.json"
    if gt_form == "table":
        converted = runner.invoke(app, ["convert", str(gt_path), str(tmp_path / "gt-table")])
        assert converted.exit_code == 0, converted.output
        gt_path = tmp_path / "gt-table"
    result = runner.invoke(app, ["eval", "pq", "--gt", str(gt_path), "--pred", str(table.parent)])
    assert result.exit_code == 2 and result.stderr.count("\n") == 1, result.output
    assert result.stderr.startswith(f"segpipe: error: {table.parent}: "), result.stderr
    for phrase in words:
        assert phrase in result.stderr, result.stderr


# --- the sweep ---------------------------------------------------------------------------------


@pytest.mark.parametrize("polygon", [[2, 2, 12, 2], [2, 2]], ids=["two-points", "one-point"])
def test_polygons_of_fewer_than_3_points_are_refused_in_one_line(tmp_path, polygon):
    gt = _gt()
    gt["annotations"][2]["segmentation"] = [polygon]
    with pytest.raises(Exception):  # two points read as a box (TypeError), one point unsupported
        _pycocotools(gt, _results())
    _refused(tmp_path, gt, _results(), "instances.json: image 2: annotation 3",
             f"a polygon has {len(polygon)} coordinates, fewer than 3 points")
    results = _results()
    results[1]["segmentation"] = [polygon]
    _refused(tmp_path, _gt(), results, "results.json: result 1 (image 1)", "fewer than 3 points")


def test_polygons_with_an_odd_coordinate_count_score_like_pycocotools(tmp_path):
    gt, results = _gt(), _results()
    gt["annotations"][0]["segmentation"][0].append(7)
    results[2]["segmentation"] = [[6, 5, 14, 5, 14, 13, 6]]  # three points and a stray coordinate
    _assert_equal(tmp_path, gt, results)


def test_uncompressed_rle_results_score_like_pycocotools(tmp_path):
    results = _results()
    for r in results:
        r["segmentation"] = _uncompressed(r["segmentation"])
    _assert_equal(tmp_path, _gt(), results)
    masks_only = [{k: v for k, v in r.items() if k != "bbox"} for r in results]
    with pytest.raises(TypeError):  # loadRes measures areas with maskUtils.area: compressed RLE only
        _pycocotools(_gt(), masks_only)
    _assert_equal(tmp_path, _gt(), masks_only,
                  reference_results=[{k: v for k, v in r.items() if k != "segmentation"}
                                     | {"segmentation": mask_utils.frPyObjects(r["segmentation"], SIZE, SIZE)}
                                     for r in masks_only])


def test_box_only_results_for_segm_score_like_pycocotools(tmp_path):
    _assert_equal(tmp_path, _gt(), [{k: v for k, v in r.items() if k != "segmentation"} for r in _results()])


def test_missing_iscrowd_reads_as_zero(tmp_path):
    gt = _gt_without("iscrowd")
    for iou_type in ("segm", "bbox"):
        _assert_equal(tmp_path, gt, _results(), reference_gt=_gt(), iou_type=iou_type)


def test_missing_area_is_refused_in_one_line(tmp_path):
    gt = _gt()
    del gt["annotations"][1]["area"]
    with pytest.raises(KeyError):
        _pycocotools(gt, _results())
    for iou_type in ("segm", "bbox"):
        _refused(tmp_path, gt, _results(), "instances.json: image 1: annotation 2: no 'area'",
                 options=("--iou-type", iou_type))


def test_non_contiguous_category_ids_score_like_pycocotools(tmp_path):
    for iou_type in ("segm", "bbox"):
        ours = _assert_equal(tmp_path, _gt(), _results(), iou_type=iou_type)
        assert set(ours["per_class"]) == {"7", "90"}


def test_images_without_annotations_score_like_pycocotools(tmp_path):
    gt = _gt()
    gt["images"] += [{"id": i, "height": SIZE, "width": SIZE, "file_name": f"{i}.jpg"} for i in (3, 4)]
    results = [*_results(), _detection(3, 7, 1, 1, 9, 0.95)]  # image 4 has neither
    for iou_type in ("segm", "bbox"):
        _assert_equal(tmp_path, gt, results, iou_type=iou_type)


def test_empty_segments_info_scores_like_panopticapi(tmp_path):
    import hotcoco.panoptic

    from pipeline.evaluate.pq import evaluate_pq

    full = np.zeros((SIZE, SIZE), np.uint32)
    full[:20], full[20:, :20] = 1, 2
    shifted = np.zeros((SIZE, SIZE), np.uint32)
    shifted[:18], shifted[20:, :24] = 1, 2
    void = np.zeros((SIZE, SIZE), np.uint32)
    # image 2: nothing annotated, nothing predicted; image 3: annotated, nothing predicted
    gt = _panoptic_file(tmp_path, "gt", {1: full, 2: void, 3: full})
    pred = _panoptic_file(tmp_path, "pred", {1: shifted, 2: void, 3: void})
    ours = evaluate_pq(gt, pred)
    with contextlib.redirect_stdout(io.StringIO()):
        reference = hotcoco.panoptic.pq_compute(gt, pred)
    assert 0 < reference["All"]["pq"] < 1
    for group in ("All", "Things", "Stuff"):
        assert ours[group]["n"] == reference[group]["n"]
        for metric in ("pq", "sq", "rq"):
            assert ours[group][metric] == pytest.approx(reference[group][metric], abs=1e-9)


def _panoptic_file(tmp_path, name, maps):
    """A COCO panoptic JSON and PNG folder; segment 1 is a thing (7), segment 2 stuff (8)."""
    (tmp_path / name).mkdir()
    annotations = []
    for image_id, ids in maps.items():
        (tmp_path / name / f"{image_id}.png").write_bytes(encode_panoptic_png(ids))
        info = []
        for segment_id, category_id in ((1, 7), (2, 8)):
            rows, cols = np.nonzero(ids == segment_id)
            if rows.size:
                info.append({"id": segment_id, "category_id": category_id, "iscrowd": 0, "area": int(rows.size),
                             "bbox": [int(cols.min()), int(rows.min()), int(np.ptp(cols)) + 1, int(np.ptp(rows)) + 1]})
        annotations.append({"image_id": image_id, "file_name": f"{image_id}.png", "segments_info": info})
    data = {"images": [{"id": i, "height": SIZE, "width": SIZE, "file_name": f"{i}.jpg"} for i in maps],
            "categories": [{"id": 7, "name": "a", "isthing": 1}, {"id": 8, "name": "s", "isthing": 0}],
            "annotations": annotations}
    (tmp_path / f"{name}.json").write_text(json.dumps(data))
    return str(tmp_path / f"{name}.json")


def test_nan_in_json_is_refused_in_one_line(tmp_path):
    results = _results()
    results[1]["score"] = float("nan")
    _refused(tmp_path, _gt(), results, "results.json: invalid JSON at line 1", "NaN or Infinity")
    gt = _gt()
    gt["annotations"][0]["area"] = float("inf")
    _refused(tmp_path, gt, _results(), "instances.json: invalid JSON at line 1", "NaN or Infinity")


def test_nan_score_in_a_predictions_table_is_refused_in_one_line(tmp_path):
    mask = np.zeros((SIZE, SIZE), bool)
    mask[2:12, 3:13] = True
    table = tmp_path / "table" / "part-0.parquet"
    write_predictions(str(table), [ImagePrediction(1, "1.jpg", SIZE, SIZE, (
        Segment.from_mask(1, 7, mask, score=float("nan")),))], "run", "model")
    gt_path, _ = _write(tmp_path, _gt(), [])
    result = runner.invoke(app, ["eval", "ap", "--gt", gt_path, "--pred", str(table.parent)])
    assert result.exit_code == 2 and result.stderr.count("\n") == 1, result.output
    assert "part-0.parquet: image 1: a detection's score is NaN" in result.stderr


def test_negative_scores_and_sizes_score_like_pycocotools(tmp_path):
    gt, results = _gt(), _results()
    results[1]["score"] = -0.5  # logits, say: only the order counts
    gt["annotations"][2]["area"] = -5.0  # outside every area range: ignored, as in COCOeval
    results[3]["bbox"] = [25, 25, -5, 5]
    for iou_type in ("segm", "bbox"):
        _assert_equal(tmp_path, gt, results, iou_type=iou_type)



def test_rle_of_another_size_than_its_image_is_refused_in_one_line(tmp_path):
    """pycocotools scores such a pair IoU -1 where the boxes meet (never a match): no reading intends it."""
    mask = np.zeros((SIZE + 1, SIZE), np.uint8, order="F")
    mask[2:6, 2:6] = 1
    rle = mask_utils.encode(mask)
    results = [{**_results()[0], "segmentation": {"size": rle["size"], "counts": rle["counts"].decode()}}]
    _refused(tmp_path, _gt(), results, "results.json", "image 1: result",
             f"RLE size [{SIZE + 1}, {SIZE}] differs from the image's [{SIZE}, {SIZE}]")


def _edit(path: str, change) -> str:
    data = json.loads(open(path).read())
    change(data)
    open(path, "w").write(json.dumps(data))
    return path


def test_panoptic_files_panopticapi_would_score_nonsense_on_are_one_line(tmp_path):
    """A ground-truth area under the pixels it shares (panopticapi: IoU above 1, or a division by 0), a
    segment id 0 (VOID in the PNG), a string image id, a category without isthing: one line each."""
    full = np.zeros((SIZE, SIZE), np.uint32)
    full[:20], full[20:, :20] = 1, 2
    gt, pred = _panoptic_file(tmp_path, "gt", {1: full}), _panoptic_file(tmp_path, "pred", {1: full})
    understated = _edit(gt, lambda d: d["annotations"][0]["segments_info"][0].update(area=3))
    _refused(tmp_path, json.loads(open(understated).read()), None, "image 1: ground-truth segment 1 has area 3",
             "shares 800 pixels", command=("eval", "pq"), files=(understated, pred))
    _edit(gt, lambda d: d["annotations"][0]["segments_info"][0].update(area=800))
    zero = _edit(pred, lambda d: d["annotations"][0]["segments_info"][0].update(id=0))
    _refused(tmp_path, None, None, "image 1: segment id 0 is not in 1..16777215 (0 is VOID)", command=("eval", "pq"),
             files=(gt, zero))
    _edit(pred, lambda d: d["annotations"][0]["segments_info"][0].update(id=1))
    text = _edit(gt, lambda d: d["annotations"][0].update(image_id="1"))
    _refused(tmp_path, None, None, "image id '1' is not an integer", command=("eval", "pq"), files=(text, pred))
    _edit(gt, lambda d: d["annotations"][0].update(image_id=1))
    no_isthing = _edit(gt, lambda d: d["categories"][0].pop("isthing"))
    _refused(tmp_path, None, None, "category 7 has no 'isthing'", command=("eval", "pq"), files=(no_isthing, pred))


def test_things_are_isthing_1_as_in_panopticapi(tmp_path):
    """panopticapi counts a category as a thing only where isthing == 1; any other value is stuff."""
    from pipeline.evaluate.pq import evaluate_pq

    full = np.zeros((SIZE, SIZE), np.uint32)
    full[:20], full[20:, :20] = 1, 2
    gt = _edit(_panoptic_file(tmp_path, "gt", {1: full}), lambda d: d["categories"][0].update(isthing=2))
    result = evaluate_pq(gt, _panoptic_file(tmp_path, "pred", {1: full}))
    assert (result["Things"]["n"], result["Stuff"]["n"], result["All"]["pq"]) == (0, 2, 1.0)


def test_string_image_ids_are_one_line_for_ap(tmp_path):
    """pycocotools sorts ids as given ("10" before "2"): reading them as numbers would reorder tied scores."""
    gt = _gt()
    for image in gt["images"]:
        image["id"] = str(image["id"])
    _refused(tmp_path, gt, _results(), "instances.json", "image id '1' is not an integer")


def test_a_later_result_with_an_empty_bbox_scores_like_pycocotools_in_the_mask_branch(tmp_path):
    """The mask branch (the first result has no bbox) keeps a later "bbox": []; COCOeval never reads it for segm."""
    results = [_compressed(r) for r in _results()]
    results[2]["bbox"] = []
    _assert_equal(tmp_path, _gt(), results)


def test_rle_counts_that_do_not_cover_the_image_are_one_line(tmp_path):
    rle = mask_utils.encode(np.zeros((SIZE, SIZE), np.uint8, order="F"))
    short = {"size": [SIZE, SIZE], "counts": mask_utils.encode(np.zeros((SIZE, SIZE - 1), np.uint8, order="F"))["counts"].decode()}
    assert rle["counts"].decode() != short["counts"]
    results = [{**_results()[0], "segmentation": short}]
    _refused(tmp_path, _gt(), results, f"image 1: a mask's RLE covers {SIZE * (SIZE - 1)} pixels, the image has {SIZE * SIZE}")


def test_iscrowd_other_than_0_or_1_is_one_line(tmp_path):
    """pycocotools ignores a ground truth with iscrowd 0.5 (truthy) yet unions it as a non-crowd (int 0)."""
    gt = _gt()
    gt["annotations"][1]["iscrowd"] = 0.5
    _refused(tmp_path, gt, _results(), "instances.json", "image 1: annotation 2: 'iscrowd' is 0.5, expected 0 or 1")


def test_a_malformed_rle_string_is_one_line(tmp_path):
    """pycocotools decodes whatever the string holds; a string outside the RLE alphabet is named instead."""
    results = [{**_results()[0], "segmentation": {"size": [SIZE, SIZE], "counts": "0é1"}}]
    _refused(tmp_path, _gt(), results, "image 1: malformed RLE (character", "outside the RLE alphabet")
