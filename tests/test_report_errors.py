"""The report's errors section: TIDE equal to tidecv, planted label errors found, hand-computed confusion, ECE, splits."""

import json
import tempfile

import numpy as np
import pytest

from pipeline.evaluate.ap import evaluate_ap
from pipeline.evaluate.pq import evaluate_pq
from pipeline.report.errors import candidates_coco, merge_errors, shard_errors, spill
from pipeline.report.parts import Parts
from pipeline.structures import ImagePrediction, Segment, encode_panoptic_png

CATEGORIES = [{"id": 1, "name": "a", "isthing": 1}, {"id": 2, "name": "b", "isthing": 1},
              {"id": 3, "name": "s", "isthing": 0}]
H, W = 40, 60


def _box(y0, x0, y1, x1):
    mask = np.zeros((H, W), bool)
    mask[y0:y1, x0:x1] = True
    return mask


def _image(image_id, boxes, scores=None, crowd=()):
    """An image of box segments: boxes as (category_id, y0, x0, y1, x1), ids 1, 2, ... in order."""
    scores = scores or [1.0] * len(boxes)
    segments = tuple(Segment.from_mask(k + 1, c, _box(*b), score=s, iscrowd=k + 1 in crowd)
                     for k, ((c, *b), s) in enumerate(zip(boxes, scores)))
    return ImagePrediction(image_id, f"{image_id}.png", H, W, segments)


def _section(truth, predictions, panoptic, shards=1, budget=1 << 16):
    """The section over `shards` shards, their per-detection records in a scratch folder read back `budget` rows
    at a time."""
    size = -(-len(truth) // shards)
    parts, spilled = [], Parts(tempfile.mkdtemp())
    for k in range(0, len(truth), size):
        ids = {t.image_id for t in truth[k:k + size]}
        part = shard_errors(truth[k:k + size], [p for p in predictions if p.image_id in ids], CATEGORIES, panoptic)
        parts.append(spill(part, spilled, k))
    try:
        return json.loads(json.dumps(merge_errors(parts, CATEGORIES, panoptic, spilled, budget)))  # JSON-ready
    finally:
        spilled.remove()


# --- a panoptic set: a grid of disjoint boxes per image --------------------------------------------------


def _panoptic_truth(n=6, seed=0):
    rng = np.random.default_rng(seed)
    images = []
    for image_id in range(1, n + 1):
        boxes = [(int(rng.integers(1, 4)), y, x, y + 15, x + 15) for y in (2, 22) for x in (2, 22, 42)
                 if rng.random() < 0.8]
        images.append(_image(image_id, boxes))
    return images


def _as_predictions(truth, score=0.9):
    return [ImagePrediction(t.image_id, t.file_name, H, W,
                            tuple(Segment(s.id, s.category_id, s.rle, s.area, s.bbox, score) for s in t.segments))
            for t in truth]


def _plant(truth):
    """Labels with one annotation removed (image 2) and one class swapped (image 4)."""
    removed, swapped = truth[1].segments[0], truth[3].segments[1]
    labels = list(truth)
    labels[1] = ImagePrediction(2, "2.png", H, W, truth[1].segments[1:])
    new = 2 if swapped.category_id == 1 else 1
    labels[3] = ImagePrediction(4, "4.png", H, W, tuple(
        Segment(s.id, new, s.rle, s.area, s.bbox) if s is swapped else s for s in truth[3].segments))
    return labels, removed, swapped, new


@pytest.mark.parametrize("panoptic", [True, False])
def test_planted_missing_label_and_swapped_class_are_found_exactly(panoptic):
    truth = _panoptic_truth()
    labels, removed, swapped, new = _plant(truth)
    section = _section(labels, _as_predictions(truth), panoptic, shards=2)
    found = {(c["kind"], c["image_id"], c["pred_segment_id"], c["gt_segment_id"], c["pred_category_id"],
              c["gt_category_id"]) for c in section["candidates"]}
    assert found == {("missing_annotation", 2, removed.id, None, removed.category_id, None),
                     ("wrong_label", 4, swapped.id, swapped.id, swapped.category_id, new)}
    wrong = next(c for c in section["candidates"] if c["kind"] == "wrong_label")
    assert wrong["evidence"] == pytest.approx(0.9) and wrong["iou"] == 1.0
    assert wrong["gt_mask"] == swapped.rle.to_coco()
    assert section["tide"]["counts"] == {"Cls": 1, "Loc": 0, "Both": 0, "Dupe": 0, "Bkg": 1, "Miss": 0}
    if panoptic:  # the prediction on the removed segment lies on VOID: PQ ignores it
        errors = section["panoptic_errors"]
        assert {k: (v["fn"], v["fp"]) for k, v in errors.items()} == {
            "wrong_class": (1, 1), "merged": (0, 0), "split": (0, 0), "missed": (0, 0), "hallucinated": (0, 0)}
        assert errors["wrong_class"]["pq_cost"] > 0


@pytest.mark.parametrize("panoptic", [True, False])
def test_clean_set_has_no_candidates_and_no_errors(panoptic):
    truth = _panoptic_truth()
    section = _section(truth, _as_predictions(truth), panoptic)
    assert section["candidates"] == []
    assert set(section["tide"]["counts"].values()) == {0}
    assert set(section["tide"]["delta_ap"].values()) == {0.0}
    assert section["tide"]["ap50"] == 100.0
    matrix = np.array(section["confusion"]["matrix"])
    assert (matrix == np.diag(np.diag(matrix))).all() and matrix[-1, -1] == 0
    assert all(im["pq"] == 1.0 for im in section["worst_images"])
    if panoptic:
        assert all(v["fn"] == v["fp"] == 0 and v["pq_cost"] == 0 for v in section["panoptic_errors"].values())
        assert section["pq"]["All"]["pq"] == 1.0


def test_confusion_matrix_by_hand():
    gt = _image(1, [(1, 0, 0, 10, 10), (2, 0, 20, 10, 30), (1, 20, 0, 30, 10)])
    pred = _image(1, [(1, 0, 0, 10, 10), (1, 0, 20, 10, 30), (2, 20, 40, 30, 50), (3, 30, 40, 40, 50)],
                  scores=[0.9, 0.8, 0.7, 0.3])  # the last is below `confident`: left out
    matrix = _section([gt], [pred], panoptic=False)["confusion"]["matrix"]  # panoptic: the stray b is on VOID, ignored
    #                a  b  s  background   (rows: ground truth; columns: prediction)
    assert matrix == [[1, 0, 0, 1],      # a: matched as a; the second a missed
                      [1, 0, 0, 0],      # b: predicted as a
                      [0, 0, 0, 0],
                      [0, 1, 0, 0]]      # a b predicted on nothing


def test_ece_by_hand():
    gt = _image(1, [(1, 0, 0, 10, 10), (1, 0, 20, 10, 30), (2, 20, 0, 30, 10)])
    pred = _image(1, [(1, 0, 0, 10, 10), (1, 20, 40, 30, 50), (1, 0, 20, 10, 30), (2, 30, 20, 40, 30)],
                  scores=[0.95, 0.91, 0.45, 0.05])  # TP, FP, TP, FP
    calibration = _section([gt], [pred], panoptic=False)["calibration"]
    # bin 9: scores 0.95, 0.91, one hit: |0.5 - 0.93|; bin 4: |1 - 0.45|; bin 0: |0 - 0.05|
    expected = (2 * abs(0.5 - 0.93) + abs(1 - 0.45) + abs(0 - 0.05)) / 4
    assert calibration["ece"] == pytest.approx(expected, abs=1e-12)
    assert calibration["mce"] == pytest.approx(0.55)
    assert [b["count"] for b in calibration["bins"]] == [1, 0, 0, 0, 1, 0, 0, 0, 0, 2]


def test_merged_and_split_by_hand():
    # image 1: two ground-truth boxes side by side under one prediction (merged), and one matched exactly;
    # image 2: one ground-truth box predicted as two halves (split)
    truth = [_image(1, [(1, 0, 0, 10, 10), (1, 0, 10, 10, 20), (1, 20, 0, 30, 10)]),
             _image(2, [(1, 0, 0, 10, 20)])]
    predictions = [_image(1, [(1, 0, 0, 10, 20), (1, 20, 0, 30, 10)]),
                   _image(2, [(1, 0, 0, 10, 10), (1, 0, 10, 10, 20)])]
    section = _section(truth, predictions, panoptic=True)
    errors = section["panoptic_errors"]
    assert {k: (v["fn"], v["fp"]) for k, v in errors.items()} == {
        "wrong_class": (0, 0), "merged": (2, 1), "split": (1, 2), "missed": (0, 0), "hallucinated": (0, 0)}
    # class a: TP 1 (IoU 1), FP 3, FN 3: PQ 1 / 4; fixing merged leaves FP 2, FN 1: 1 / 2.5; split likewise
    assert section["pq"]["All"]["pq"] == pytest.approx(0.25)
    assert errors["merged"]["pq_cost"] == pytest.approx(0.4 - 0.25)
    assert errors["split"]["pq_cost"] == pytest.approx(0.4 - 0.25)
    assert [im["image_id"] for im in section["worst_images"]] == [2, 1]
    assert section["worst_images"][0] == {"image_id": 2, "pq": 0.0, "tp": 0, "fp": 2, "fn": 1}


def test_missed_hallucinated_and_bad_boundary():
    # a cut short (IoU 0.7), b missed, an `a` predicted inside the stuff region (which it leaves unmatched)
    truth = [_image(1, [(1, 0, 0, 10, 10), (2, 10, 20, 20, 30), (3, 30, 0, 40, 60)])]
    predictions = [_image(1, [(1, 0, 0, 10, 7), (1, 30, 40, 40, 50)], scores=[0.8, 0.6])]
    section = _section(truth, predictions, panoptic=True)
    assert {k: (v["fn"], v["fp"]) for k, v in section["panoptic_errors"].items()} == {
        "wrong_class": (0, 0), "merged": (0, 0), "split": (0, 0), "missed": (2, 0), "hallucinated": (0, 1)}
    # a: TP 1 (IoU 0.7), FP 1; b: FN 1; s: FN 1: PQ (0.7 / 1.5 + 0 + 0) / 3; without the missed, only a is left
    assert section["pq"]["All"]["pq"] == pytest.approx(0.7 / 1.5 / 3)
    assert section["panoptic_errors"]["missed"]["pq_cost"] == pytest.approx(0.7 / 1.5 - 0.7 / 1.5 / 3)
    assert section["panoptic_errors"]["hallucinated"]["pq_cost"] == pytest.approx((0.7 + 0 + 0) / 3 - 0.7 / 1.5 / 3)
    [candidate] = section["candidates"]  # the stray `a` overlaps the stuff region (IoU 1/6): not a missing label
    assert candidate["kind"] == "bad_boundary" and candidate["pred_segment_id"] == 1
    assert candidate["evidence"] == pytest.approx(0.8 * (1 - 0.7))


@pytest.mark.parametrize("panoptic", [True, False])
def test_a_prediction_inside_a_crowd_is_no_error(panoptic):
    truth = [_image(1, [(1, 0, 0, 10, 10), (1, 20, 0, 40, 30)], crowd=(2,))]
    predictions = [_image(1, [(1, 0, 0, 10, 10), (1, 25, 5, 35, 15)], scores=[0.9, 0.8])]
    section = _section(truth, predictions, panoptic)
    assert section["candidates"] == [] and set(section["tide"]["counts"].values()) == {0}
    assert section["confusion"]["matrix"][0] == [1, 0, 0, 0] and section["tide"]["ap50"] == 100.0


# --- equal to segpipe eval and to tidecv ---------------------------------------------------------------------


def _noisy_predictions(truth, seed):
    """Detections with every TIDE error: shifted, relabelled, duplicated, background, missed; distinct scores."""
    rng = np.random.default_rng(seed)
    out = []
    for t in truth:
        boxes = []
        for s in t.segments:
            x, y, w, h = (int(v) for v in s.bbox)
            kind = rng.integers(0, 6)
            if kind == 5:
                continue  # missed
            dy, dx = (int(rng.integers(-6, 7)), int(rng.integers(-6, 7))) if kind in (1, 4) else (0, 0)
            category = (s.category_id % 3) + 1 if kind in (2, 4) else s.category_id  # 4: both
            y0, x0 = max(0, y + dy), max(0, x + dx)
            boxes.append((category, y0, x0, min(H, y0 + h), min(W, x0 + w)))
            if kind == 3:
                boxes.append((category, y0, x0, min(H, y0 + h - 2), min(W, x0 + w)))  # a duplicate
        if rng.random() < 0.5:
            boxes.append((int(rng.integers(1, 4)), 36, 0, 40, 4))  # background
        scores = list(rng.random(len(boxes)))
        out.append(_image(t.image_id, boxes, scores))
    return out


def test_tide_equals_tidecv():
    tidecv = pytest.importorskip("tidecv")
    truth = _panoptic_truth(n=12, seed=3)
    truth[5] = ImagePrediction(6, "6.png", H, W, ())  # an image without ground truth
    predictions = _noisy_predictions(truth, seed=4)
    section = _section(truth, predictions, panoptic=False, shards=3)["tide"]

    gt, preds = tidecv.Data("gt"), tidecv.Data("preds")
    for t, p in zip(truth, predictions):
        gt.add_image(t.image_id, t.file_name)
        for s in t.segments:
            gt.add_ground_truth(t.image_id, s.category_id, list(s.bbox), s.rle.encoded())
        for s in p.segments:
            preds.add_detection(p.image_id, s.category_id, s.score, list(s.bbox), s.rle.encoded())
    tide = tidecv.TIDE(mode=tidecv.TIDE.MASK)
    run = tide.evaluate(gt, preds, name="preds")
    main, special = tide.get_main_errors()["preds"], tide.get_special_errors()["preds"]
    counts = {error.short_name: n for error, n in run.count_errors().items()}
    assert section["ap50"] == pytest.approx(run.ap, abs=1e-9)
    assert section["counts"] == counts
    assert min(counts.values()) > 0  # every type planted
    for name, value in main.items():
        assert section["delta_ap"][name] == pytest.approx(value, abs=1e-9), name
    for name, value in special.items():
        assert section["special_delta_ap"][name] == pytest.approx(value, abs=1e-9), name


def test_reading_the_records_back_a_class_at_a_time_changes_no_number():
    truth = _panoptic_truth(n=12, seed=3)
    predictions = _noisy_predictions(truth, seed=4)  # overlapping: instances
    whole = _section(truth, predictions, False, shards=3)
    by_class = _section(truth, predictions, False, shards=3, budget=1)  # one category per read
    assert by_class == whole
    assert sum(whole["tide"]["counts"].values()) > 0 and whole["ap"]["summary"]["AP"] > 0


def test_pq_and_ap_per_class_equal_segpipe_eval(tmp_path):
    truth = _panoptic_truth(n=8, seed=5)
    predictions = _noisy_predictions(truth, seed=6)
    panoptic_predictions = [_disjoint(p) for p in predictions]
    section = _section(truth, panoptic_predictions, panoptic=True, shards=2)
    _write_panoptic(tmp_path / "gt", truth)
    _write_panoptic(tmp_path / "pred", panoptic_predictions)
    expected = evaluate_pq(str(tmp_path / "gt.json"), str(tmp_path / "pred.json"))
    assert section["pq"]["per_class"] == json.loads(json.dumps(expected["per_class"]))
    assert section["pq"]["All"] == expected["All"]
    assert section["miou"] == json.loads(json.dumps(expected["semantic"]))
    errors, per_class = section["panoptic_errors"], section["pq"]["per_class"].values()
    assert sum(v["fn"] for v in errors.values()) == sum(c["fn"] for c in per_class) > 0  # every PQ error typed
    assert sum(v["fp"] for v in errors.values()) == sum(c["fp"] for c in per_class) > 0

    instances = _section(truth, predictions, panoptic=False, shards=3)
    annotations = [{"id": 100 * t.image_id + s.id, "image_id": t.image_id, "category_id": s.category_id,
                    "segmentation": s.rle.to_coco(), "area": s.area, "bbox": list(s.bbox), "iscrowd": 0}
                   for t in truth for s in t.segments]
    images = [{"id": t.image_id, "file_name": t.file_name, "height": H, "width": W} for t in truth]
    (tmp_path / "instances.json").write_text(json.dumps({"images": images, "annotations": annotations,
                                                         "categories": CATEGORIES}))
    (tmp_path / "results.json").write_text(json.dumps([r for p in predictions for r in p.to_coco_results()]))
    expected = evaluate_ap(str(tmp_path / "instances.json"), str(tmp_path / "results.json"))
    assert instances["ap"]["per_class"] == json.loads(json.dumps(expected["per_class"]))
    assert instances["ap"]["summary"]["AP"] == expected["AP"]


def _disjoint(prediction):
    """A panoptic prediction from overlapping detections: the best score paints last, so it wins."""
    ids = np.zeros((H, W), np.uint32)
    for s in sorted(prediction.segments, key=lambda s: s.score):
        ids[s.rle.to_mask()] = s.id
    kept = [s for s in prediction.segments if (ids == s.id).any()]
    return ImagePrediction(prediction.image_id, prediction.file_name, H, W,
                           tuple(Segment.from_mask(s.id, s.category_id, ids == s.id, s.score) for s in kept))


def _write_panoptic(stem, images):
    stem.mkdir()
    annotations = []
    for image in images:
        ids, segments_info = image.to_panoptic()
        (stem / image.file_name).write_bytes(encode_panoptic_png(ids))
        annotations.append({"image_id": image.image_id, "file_name": image.file_name, "segments_info": segments_info})
    data = {"images": [{"id": im.image_id, "file_name": im.file_name, "height": H, "width": W} for im in images],
            "annotations": annotations, "categories": CATEGORIES}
    stem.with_suffix(".json").write_text(json.dumps(data))


def test_candidates_coco_is_the_review_hand_off():
    truth = _panoptic_truth()
    labels, removed, swapped, new = _plant(truth)
    section = _section(labels, _as_predictions(truth), panoptic=True)
    images = [{"id": t.image_id, "file_name": f"photos/{t.image_id}.jpg", "height": H, "width": W} for t in truth]
    coco = candidates_coco(section, images, CATEGORIES)
    assert [im["file_name"] for im in coco["images"]] == ["2.jpg", "4.jpg"] or \
        [im["file_name"] for im in coco["images"]] == ["4.jpg", "2.jpg"]
    by_kind = {a["label_error"]["kind"]: a for a in coco["annotations"]}
    assert by_kind["wrong_label"]["category_id"] == swapped.category_id
    assert by_kind["wrong_label"]["segmentation"] == swapped.rle.to_coco()
    assert by_kind["missing_annotation"]["segmentation"] == removed.rle.to_coco()
    assert by_kind["missing_annotation"]["area"] == removed.area and by_kind["missing_annotation"]["iscrowd"] == 1
