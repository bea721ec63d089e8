"""SAM proposals: SA-1B files read and written exactly, proposals given a class by a panoptic prediction."""

import json

import numpy as np
import pyarrow.parquet as pq
import pytest
from typer.testing import CliRunner

from pipeline.cli import app
from pipeline.structures import Rle

runner = CliRunner()
HEIGHT, WIDTH = 6, 8


def _mask(y0, y1, x0, x1):
    mask = np.zeros((HEIGHT, WIDTH), bool)
    mask[y0:y1, x0:x1] = True
    return mask


def _counts(mask):
    return Rle.from_mask(mask).counts


def _sa1b_image(image_id):
    """An SA-1B file's content as SAM writes it: a 3x4 block and a single pixel (bbox floats, as given here)."""
    return {"image": {"image_id": image_id, "file_name": f"sa_{image_id}.jpg", "height": HEIGHT, "width": WIDTH},
            "annotations": [
                {"id": 505553437, "segmentation": {"size": [HEIGHT, WIDTH], "counts": _counts(_mask(1, 4, 2, 6))},
                 "area": 12, "bbox": [2.0, 1.0, 3.0, 2.0], "predicted_iou": 0.9871234567891234,
                 "point_coords": [[3.5, 2.25]], "stability_score": 0.951171875, "crop_box": [0, 0, 8, 6]},
                {"id": 7, "segmentation": {"size": [HEIGHT, WIDTH], "counts": _counts(_mask(5, 6, 7, 8))},
                 "area": 1, "bbox": [7.0, 5.0, 0.0, 0.0], "predicted_iou": 0.88,
                 "point_coords": [[7.1, 5.9]], "stability_score": 1.0, "crop_box": [4, 3, 4, 3]},
            ]}


@pytest.fixture
def sa1b(tmp_path):
    folder = tmp_path / "sa1b"
    folder.mkdir()
    for image_id in (2, 10):  # sa_2 before sa_10: numbers in names in numeric order
        (folder / f"sa_{image_id}.json").write_text(json.dumps(_sa1b_image(image_id)))
    return folder


def test_a_hand_made_sa1b_folder_round_trips_to_the_same_bytes(sa1b, tmp_path):
    table, again = tmp_path / "table", tmp_path / "again"
    result = runner.invoke(app, ["convert", str(sa1b), str(table), "--images", str(tmp_path / "images")])
    assert result.exit_code == 0, result.output
    assert "predictions table, 2 images, 4 segments" in result.output
    result = runner.invoke(app, ["convert", str(table), str(again)])
    assert result.exit_code == 0, result.output
    assert sorted(p.name for p in again.iterdir()) == ["sa_10.json", "sa_2.json"]
    for name in ("sa_2.json", "sa_10.json"):
        assert (again / name).read_bytes() == (sa1b / name).read_bytes()  # keys, order, ints and floats as given
    run = json.loads((table / "run.json").read_text())
    assert run["input"] == str(tmp_path / "images") and run["model"] == "sa1b"
    assert run["sa1b"]["forms"] == {"area": "int", "bbox": "float", "predicted_iou": "float", "point_coords": "float",
                                    "stability_score": "float", "crop_box": "int"}
    assert json.loads((table / "categories.json").read_text()) == [
        {"id": 1, "name": "object", "supercategory": "object", "isthing": 1}]


def test_sa1b_read_gives_the_files_values_in_the_table_columns(sa1b, tmp_path):
    table = tmp_path / "table"
    assert runner.invoke(app, ["convert", str(sa1b), str(table)]).exit_code == 0
    rows = pq.read_table(table / "predictions").to_pylist()
    assert [(r["image_id"], r["segment_id"]) for r in rows] == [(2, 505553437), (2, 7), (10, 505553437), (10, 7)]
    first = rows[0]
    assert first["file_name"] == "sa_2.jpg" and (first["height"], first["width"]) == (HEIGHT, WIDTH)
    assert first["category_id"] == 1 and first["iscrowd"] is False
    assert first["score"] == 0.9871234567891234 and first["stability"] == 0.951171875
    assert first["point_coords"] == [[3.5, 2.25]] and first["crop_box"] == [0.0, 0.0, 8.0, 6.0]
    assert first["area"] == 12 and first["rle"] == _counts(_mask(1, 4, 2, 6))
    assert first["bbox"] == [2.0, 1.0, 4.0, 3.0]  # the table's box is COCO's tight box; SAM's is one less wide and high
    assert rows[1]["bbox"] == [7.0, 5.0, 1.0, 1.0] and rows[1]["touches_border"] is True
    assert first["class_agreement"] is None and first["flip_iou"] is None
    # the images are where SA-1B keeps them unless told: beside the JSON files
    assert json.loads((table / "run.json").read_text())["input"] == str(sa1b)


def test_sam_box_is_what_segment_anything_computes():
    torch = pytest.importorskip("torch")
    amg = pytest.importorskip("segment_anything.utils.amg")
    from pipeline.io.sa1b import sam_box

    for mask in (_mask(1, 4, 2, 6), _mask(5, 6, 7, 8), _mask(0, 6, 0, 8), np.zeros((HEIGHT, WIDTH), bool)):
        rle = Rle.from_mask(mask)
        theirs = amg.box_xyxy_to_xywh(amg.batched_mask_to_box(torch.as_tensor(mask))).tolist()
        assert sam_box(rle.bbox(), rle.area()) == theirs


@pytest.mark.parametrize("change, message", [
    (lambda d: {"images": [], "annotations": []}, "not an SA-1B file"),
    (lambda d: d["annotations"][0]["segmentation"].update(size=[HEIGHT, WIDTH + 1]), "mask size [6, 9] is not the image's [6, 8]"),
    (lambda d: d["annotations"][1].update(bbox=[7.0, 5.0, 1.0, 1.0]), "bbox [7.0, 5.0, 1.0, 1.0] is not its mask's box [7.0, 5.0, 0.0, 0.0]"),
    (lambda d: d["annotations"][1].update(area=2), "area 2 is not its mask's 1 pixels"),
    (lambda d: d["annotations"][1].update(bbox=[7, 5, 0, 0]), "'bbox' holds ints where earlier annotations hold floats"),
    (lambda d: d["annotations"][1].pop("crop_box") and None, "annotation lacks 'crop_box'"),
    (lambda d: d["annotations"][1].update(category_id=3), "annotation has 'category_id', which SA-1B has not"),
    (lambda d: d["annotations"][1]["segmentation"].update(counts="0"), "RLE counts cover 0 pixels, the image 48"),
])
def test_bad_sa1b_input_is_one_line(tmp_path, change, message):
    folder = tmp_path / "bad"
    folder.mkdir()
    content = _sa1b_image(1)
    content = change(content) or content
    (folder / "sa_1.json").write_text(json.dumps(content))
    result = runner.invoke(app, ["convert", str(folder), str(tmp_path / "out")])
    assert result.exit_code == 2 and message in result.stderr and result.stderr.count("\n") == 1, result.output
    assert "sa_1.json" in result.stderr


# --- segpipe classify ---------------------------------------------------------------------------

OBJECT = [{"id": 1, "name": "object", "supercategory": "object", "isthing": 1}]
PANOPTIC_CATEGORIES = [{"id": 7, "name": "a", "isthing": 1}, {"id": 8, "name": "b", "isthing": 0}]


def _infer_folder(path, categories, images, input="images"):
    from pipeline.io.tables import write_predictions

    (path / "predictions").mkdir(parents=True)
    (path / "run.json").write_text(json.dumps({"input": input, "run_id": path.name, "model": path.name}))
    (path / "categories.json").write_text(json.dumps(categories))
    write_predictions(str(path / "predictions" / "part-00000.parquet"), images, path.name, path.name)
    return path


def _proposal(id, mask):
    from dataclasses import replace

    from pipeline.structures import Segment

    return replace(Segment.from_mask(id, 1, mask, score=0.9, stability=0.95), point_coords=((1.5, 2.5),),
                   crop_box=(0.0, 0.0, float(WIDTH), float(HEIGHT)))


@pytest.fixture
def runs(tmp_path):
    """Proposals and a panoptic prediction of x.jpg (numbered differently by the two runs), and proposals of y.jpg,
    which the panoptic run has no rows for. Panoptic: class a on rows 0-1 x cols 0-1 and rows 2-5 x cols 4-7,
    class b on rows 0-1 x col 2, VOID elsewhere."""
    from pipeline.structures import ImagePrediction, Segment

    panoptic = ImagePrediction(99, "x.jpg", HEIGHT, WIDTH, (
        Segment.from_mask(1, 7, _mask(0, 2, 0, 2)), Segment.from_mask(2, 8, _mask(0, 2, 2, 3)),
        Segment.from_mask(3, 7, _mask(2, 6, 4, 8))))
    proposals = ImagePrediction(2, "x.jpg", HEIGHT, WIDTH, (
        _proposal(1, _mask(0, 2, 0, 4)),  # 8 pixels: 4 a, 2 b, 2 VOID -> a, 0.5
        _proposal(2, _mask(4, 6, 0, 2)),  # 4 pixels, all VOID -> unclassified
        _proposal(3, _mask(0, 6, 3, 8)),  # 30 pixels: 16 a, 14 VOID -> a, 16/30
        _proposal(4, _mask(0, 2, 1, 3)),  # 4 pixels: 2 a, 2 b -> the tie goes to the smaller id, a, 0.5
        _proposal(5, _mask(1, 3, 0, 5)),  # 10 pixels: 3 a (two segments), 1 b, 6 VOID -> a, 0.3
    ))
    other = ImagePrediction(1, "y.jpg", HEIGHT, WIDTH, (_proposal(1, _mask(0, 1, 0, 1)),))
    return (_infer_folder(tmp_path / "sam", OBJECT, [other, proposals], input=str(tmp_path / "images")),
            _infer_folder(tmp_path / "panoptic", PANOPTIC_CATEGORIES, [panoptic]))


def test_each_proposal_gets_the_class_covering_most_of_its_pixels(runs, tmp_path):
    sam, panoptic = runs
    out = tmp_path / "classified"
    result = runner.invoke(app, ["classify", "--proposals", str(sam), "--panoptic", str(panoptic), "--out", str(out)])
    assert result.exit_code == 0, result.output
    assert "4 of 6 proposals classified on 2 images; 2 without a labelled pixel left out" in result.output
    rows = pq.read_table(out / "predictions").to_pylist()
    # largest first (segpipe train paints rows in order: smaller proposals on larger ones keep their pixels)
    assert [(r["image_id"], r["segment_id"], r["category_id"], r["class_agreement"], r["area"]) for r in rows] == [
        (2, 3, 7, 16 / 30, 30), (2, 5, 7, 0.3, 10), (2, 1, 7, 0.5, 8), (2, 4, 7, 0.5, 4)]
    assert all(r["score"] == 0.9 and r["stability"] == 0.95 and r["point_coords"] == [[1.5, 2.5]] for r in rows)
    summary = json.loads((out / "classify.json").read_text())
    assert summary["counts"] == {"images": 2, "images_without_panoptic": 1, "proposals": 6, "classified": 4,
                                 "unclassified": 2}
    assert summary["per_category"] == {"7": 4}
    assert json.loads((out / "categories.json").read_text()) == PANOPTIC_CATEGORIES
    run = json.loads((out / "run.json").read_text())
    assert run["input"] == str(tmp_path / "images") and run["panoptic"] == str(panoptic)
    # the classified proposals go through the filter like any predictions
    filtered = runner.invoke(app, ["filter", "--pred", str(out), "--out", str(tmp_path / "f"),
                                   "--min-class-agreement", "0.5", "--duplicate-iou", "1"])
    assert filtered.exit_code == 0 and "3 of 4 segments kept; rejected by min_class_agreement 1" in filtered.output


def test_bad_classify_inputs_are_one_line(runs, tmp_path):
    from pipeline.structures import ImagePrediction, Segment

    sam, panoptic = runs
    overlapping = _infer_folder(tmp_path / "overlapping", PANOPTIC_CATEGORIES, [ImagePrediction(
        1, "x.jpg", HEIGHT, WIDTH, (Segment.from_mask(1, 7, _mask(0, 2, 0, 2)), Segment.from_mask(2, 8, _mask(1, 3, 0, 2))))])
    for proposals, labels, message in (
        (panoptic, panoptic, "has 2 categories; --proposals must be class-agnostic"),
        (sam, overlapping, "panoptic segment 2 overlaps another; --panoptic must be a panoptic model's output"),
        (sam, tmp_path, "not a `segpipe infer` output folder"),
    ):
        result = runner.invoke(app, ["classify", "--proposals", str(proposals), "--panoptic", str(labels),
                                     "--out", str(tmp_path / "out")])
        assert result.exit_code == 2 and message in result.stderr and result.stderr.count("\n") == 1, result.output


def test_classified_proposals_do_not_become_sa1b_files(runs, tmp_path):
    sam, panoptic = runs
    out = tmp_path / "classified"
    assert runner.invoke(app, ["classify", "--proposals", str(sam), "--panoptic", str(panoptic), "--out", str(out)]).exit_code == 0
    result = runner.invoke(app, ["convert", str(out), str(tmp_path / "sa1b")])
    assert result.exit_code == 2 and "category 7; SA-1B holds class-agnostic masks" in result.stderr, result.output


def _jpeg():
    import io

    from PIL import Image

    jpeg = io.BytesIO()
    Image.fromarray(np.zeros((HEIGHT, WIDTH, 3), np.uint8)).save(jpeg, format="JPEG")
    return jpeg.getvalue()


def test_classified_proposals_are_training_labels_smaller_ones_on_top(runs, tmp_path):
    from pipeline.train.data import decode, load_dataset

    sam, panoptic = runs
    out = tmp_path / "classified"
    assert runner.invoke(app, ["classify", "--proposals", str(sam), "--panoptic", str(panoptic), "--out", str(out)]).exit_code == 0
    data = load_dataset(str(out))
    assert data.kind == "predictions" and data.images == str(tmp_path / "images")
    sample = decode(data, data.examples[0], _jpeg(), None)
    # rows 3, 5, 1, 4 painted as 1, 2, 3, 4: the 4-pixel proposal 4 keeps all its pixels on top of 1 and 5
    assert (sample.ids[_mask(0, 2, 1, 3)] == 4).all()
    assert sample.ids[0, 0] == 3 and sample.ids[2, 0] == 2 and sample.ids[5, 5] == 1 and sample.ids[5, 0] == 0
    assert [s["category_id"] for s in sample.segments] == [7, 7, 7, 7]


def test_sa1b_annotation_ids_past_two_to_the_24_train(sa1b, tmp_path):
    from pipeline.train.data import decode, load_dataset

    table = tmp_path / "table"
    assert runner.invoke(app, ["convert", str(sa1b), str(table)]).exit_code == 0
    data = load_dataset(str(table))
    sample = decode(data, data.examples[0], _jpeg(), None)  # annotation 505553437 is painted as 1
    assert sample.ids.sum() == 12 * 1 + 1 * 2 and [s["id"] for s in sample.segments] == [1, 2]
