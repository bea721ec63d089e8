"""`segpipe convert`: COCO files -> dataset tables -> COCO files, exactly; tables readable everywhere, read by shard."""

import contextlib
import io
import json
import re
import shutil

import duckdb
import numpy as np
import pyarrow.dataset as ds
import pyarrow.parquet as pq
import pytest
from pycocotools import mask as mask_utils
from typer.testing import CliRunner

from pipeline.cli import app
from pipeline.convert import convert
from pipeline.errors import SegpipeError
from pipeline.io.tables import is_dataset_table, open_dataset_table, row_groups_holding
from pipeline.structures import Rle, Segment, decode_panoptic_png, encode_panoptic_png, rle_counts
from pipeline.validate import validate


def _canonical(uri) -> str:
    with open(uri) as f:
        return json.dumps(json.load(f), sort_keys=True)


def _id_maps(folder, data) -> dict:
    return {a["file_name"]: decode_panoptic_png((folder / a["file_name"]).read_bytes(), "") for a in data["annotations"]}


def _round_trip(src, tmp_path, **options):
    """COCO -> table -> COCO; the table's folder and the JSON written back."""
    table, back = tmp_path / "table", tmp_path / "back" / src.name
    convert(str(src), str(table), **options)
    assert is_dataset_table(str(table))
    convert(str(table), str(back))
    return table, back


def _instances_file(path):
    """Every shape of annotation real instance files carry, out of image order, with extra keys everywhere."""
    h, w = 10, 12
    mask = np.zeros((h, w), bool)
    mask[2:6, 3:9] = True
    compressed = Rle.from_mask(mask).to_coco()
    data = {
        "info": {"description": "hand-written", "year": 2024}, "licenses": [{"id": 1, "name": "CC", "url": "u"}],
        "categories": [{"id": 1, "name": "person", "supercategory": "human", "keypoints": []},
                       {"id": 7, "name": "car", "supercategory": "vehicle", "color": [1, 2, 3]}],
        "images": [{"id": 3, "file_name": "c.jpg", "height": h, "width": w},
                   {"id": 1, "file_name": "a.jpg", "height": h, "width": w, "license": 1, "coco_url": "http://x/a.jpg",
                    "date_captured": "2013-11-14 17:02:52"},
                   {"id": 2, "file_name": "b.jpg", "height": h, "width": w, "flickr_url": None}],
        "annotations": [
            {"id": 5, "image_id": 2, "category_id": 1, "iscrowd": 0, "area": 12.5, "bbox": [1.5, 2.0, 4.25, 5.0],
             "segmentation": [[1.5, 2.0, 5.75, 2.0, 5.75, 7.0], [8.0, 8.0, 9.5, 8.0, 9.5, 9.0]]},
            # A crowd: uncompressed RLE with zero-length runs inside, an integer area, a box mixing ints and floats.
            {"id": 2, "image_id": 1, "category_id": 1, "iscrowd": 1, "area": 7, "bbox": [0, 3.0, 1, 7],
             "segmentation": {"size": [h, w], "counts": [3, 0, 5, 2, 0, 0, 110]}},
            {"id": 7, "image_id": 1, "category_id": 7, "iscrowd": 0, "area": 24, "bbox": [3, 2, 6, 4],
             "segmentation": compressed, "attributes": {"occluded": False, "rotation": 0.0}},
            {"id": 9, "image_id": 2, "category_id": 7, "iscrowd": 0, "area": 0.0, "bbox": [0.0, 0.0, 0.0, 0.0],
             "segmentation": []},
            {"id": 11, "image_id": 1, "category_id": 7, "iscrowd": 0, "area": 20.0, "bbox": [1.0, 1.0, 4.0, 5.0]},
            {"id": 12, "image_id": 2, "category_id": 1, "iscrowd": 0, "area": 35, "bbox": [1, 1, 7, 5],
             "segmentation": [[1, 1, 8, 1, 8, 6, 1, 6]]},
            {"id": 13, "image_id": 2, "category_id": 1, "iscrowd": 0, "area": 35.0, "bbox": [1, 1, 7, 5],
             "segmentation": [[1, 1.5, 8, 1, 8, 6.0, 1, 6]]},
        ],
    }
    path.write_text(json.dumps(data))
    return data


def _panoptic_file(path):
    """Ids past 65,535 (up to the largest a PNG holds), an image with empty segments_info, extra keys."""
    ids = np.zeros((8, 9), np.uint32)
    ids[:4] = 70_000
    ids[4:, :5] = 3
    ids[5:, 7:] = 16_777_215
    infos = [dict(Segment.from_mask(i, c, ids == i).segment_info(), **extra)
             for i, c, extra in ((70_000, 2, {}), (3, 1, {"attributes": {"truncated": True}}), (16_777_215, 2, {}))]
    folder = path.parent / path.stem
    folder.mkdir()
    (folder / "p1.png").write_bytes(encode_panoptic_png(ids))
    (folder / "p2.png").write_bytes(encode_panoptic_png(np.zeros((5, 4), np.uint32)))
    data = {"info": {"v": 1}, "licenses": [], "custom": {"k": [1, 2.0]},
            "categories": [{"id": 1, "name": "person", "isthing": 1, "color": [220, 20, 60], "supercategory": "h"},
                           {"id": 2, "name": "sky", "isthing": 0, "color": [70, 130, 180], "note": "x"}],
            "images": [{"id": 9, "file_name": "b.jpg", "height": 5, "width": 4},
                       {"id": 4, "file_name": "a.jpg", "height": 8, "width": 9, "license": 3}],
            "annotations": [{"image_id": 4, "file_name": "p1.png", "segments_info": infos, "reviewer": "r"},
                            {"image_id": 9, "file_name": "p2.png", "segments_info": []}]}
    path.write_text(json.dumps(data))
    return data


def test_instances_round_trip_is_exact(dataset, tmp_path):
    for src in (dataset / "annotations" / "instances_val.json", tmp_path / "instances.json"):
        if not src.exists():
            _instances_file(src)
        _, back = _round_trip(src, tmp_path / src.stem, row_group_images=2)
        assert _canonical(back) == _canonical(src)
        # The synthetic file is valid; the hand-written one keeps what validate flags (e.g. the empty polygon list).
        problems = [(p.message, p.image_id, p.segment_id) for p in validate(str(back)).problems]
        assert problems == [(p.message, p.image_id, p.segment_id) for p in validate(str(src)).problems]
        assert problems == [] or src.name == "instances.json"


def test_instance_forms_and_masks_are_recorded(tmp_path):
    data = _instances_file(tmp_path / "instances.json")
    table, _ = _round_trip(tmp_path / "instances.json", tmp_path)
    rows = {r["segment_id"]: r for r in open_dataset_table(str(table)).segments().to_pylist()}
    forms = {i: r["form"] for i, r in rows.items()}
    assert forms == {5: "polygons", 2: "rle_list", 7: "rle", 9: "empty", 11: "absent", 12: "polygons_int", 13: "json"}
    assert rows[11]["rle"] is None and all(r["rle"] for i, r in rows.items() if i != 11)
    assert rows[2]["int_bits"] == 0b11011 and rows[5]["int_bits"] == 0 and rows[7]["int_bits"] == 0b11111
    assert json.loads(rows[7]["extra"]) == {"attributes": {"occluded": False, "rotation": 0.0}}
    anns = {a["id"]: a for a in data["annotations"]}
    for i in (5, 2, 9, 12):  # the mask is what pycocotools' annToRLE makes of the annotation
        segmentation = anns[i]["segmentation"]
        reference = (mask_utils.merge(mask_utils.frPyObjects(segmentation, 10, 12)) if isinstance(segmentation, list)
                     and segmentation else mask_utils.frPyObjects(segmentation, 10, 12) if segmentation else None)
        if reference is not None:
            assert rows[i]["rle"] == reference["counts"].decode()
    assert mask_utils.area({"size": [10, 12], "counts": rows[9]["rle"].encode()}) == 0
    assert [r["segment_id"] for r in open_dataset_table(str(table)).segments().to_pylist()] == [2, 7, 11, 5, 9, 12, 13]


def test_uncompressed_rle_runs_survive_compression():
    """pycocotools' frPyObjects / rleToString keep every run, zeros included, so the list form is regenerated."""
    rng = np.random.default_rng(0)
    for _ in range(50):
        runs = rng.integers(0, 40, rng.integers(1, 30)).tolist() + [0] * int(rng.integers(0, 2))
        encoded = mask_utils.frPyObjects({"size": [1, sum(runs)], "counts": runs}, 1, sum(runs))
        assert rle_counts(encoded["counts"].decode()) == runs


def test_panoptic_round_trip_is_exact_and_pq_is_one(dataset, tmp_path):
    import hotcoco.panoptic

    for src in (dataset / "annotations" / "panoptic_val.json", tmp_path / "panoptic.json"):
        original = json.loads(src.read_text()) if src.exists() else _panoptic_file(src)
        _, back = _round_trip(src, tmp_path / src.stem, row_group_images=5)
        assert _canonical(back) == _canonical(src)
        maps, expected = _id_maps(back.parent / back.stem, original), _id_maps(src.parent / src.stem, original)
        assert maps.keys() == expected.keys() and all(np.array_equal(maps[k], expected[k]) for k in maps)
        assert validate(str(back)).problems == []
        with contextlib.redirect_stdout(io.StringIO()):
            result = hotcoco.panoptic.pq_compute(str(src), str(back))
        assert result["All"]["pq"] == pytest.approx(1.0, abs=1e-12)


def test_images_come_back_in_file_order_with_uris(tmp_path):
    _instances_file(tmp_path / "instances.json")
    table = tmp_path / "table"
    convert(str(tmp_path / "instances.json"), str(table), images_dir=str(tmp_path / "imgs"))
    images = open_dataset_table(str(table)).images(columns=["image_id", "position", "uri"]).to_pylist()
    assert [i["image_id"] for i in images] == [1, 2, 3] and [i["position"] for i in images] == [1, 2, 0]
    assert images[0]["uri"] == str(tmp_path / "imgs" / "a.jpg")


def test_tables_read_everywhere_in_image_order_and_shards_read_only_their_row_groups(dataset, tmp_path):
    table = tmp_path / "table"
    convert(str(dataset / "annotations" / "panoptic_val.json"), str(table), row_group_images=3)
    segments = table / "segments.parquet"
    metadata = pq.ParquetFile(segments).metadata
    assert metadata.num_row_groups == 4 and pq.ParquetFile(table / "images.parquet").metadata.num_row_groups == 4
    arrow = pq.read_table(segments)
    ids = arrow["image_id"].to_pylist()
    assert ids == sorted(ids) and len(set(ids)) == 12
    pandas = pq.read_table(segments).to_pandas()
    assert duckdb.sql(f"select count(*), count(distinct image_id) from '{segments}'").fetchall() == [(len(pandas), 12)]
    assert duckdb.sql(f"select count(*) from '{table / 'images.parquet'}'").fetchall() == [(12,)]

    dataset_table = open_dataset_table(str(table))
    shard = [5, 6]
    assert row_groups_holding(metadata, np.array(shard)) == [1]  # images 4..6 form row group 1
    read = []
    original = pq.ParquetFile.read_row_groups

    def counting(self, groups, *args, **kwargs):
        read.extend(groups)
        return original(self, groups, *args, **kwargs)

    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(pq.ParquetFile, "read_row_groups", counting)
        rows = dataset_table.segments(shard, columns=["segment_id", "rle"])
    assert read == [1] and rows.column_names == ["segment_id", "rle"]
    expected = arrow.filter(ds.field("image_id").isin(shard))
    assert rows["segment_id"].to_pylist() == expected["segment_id"].to_pylist()
    assert dataset_table.segments([]).num_rows == 0 and dataset_table.kind == "panoptic"
    assert [c["id"] for c in dataset_table.categories] == [c["id"] for c in json.loads(
        (dataset / "annotations" / "panoptic_val.json").read_text())["categories"]]


def test_s3_round_trip(dataset, s3_bucket, tmp_path):
    src = dataset / "annotations" / "panoptic_val.json"
    table, back = f"s3://{s3_bucket}/table", f"s3://{s3_bucket}/coco/panoptic_val.json"
    convert(str(src), table, row_group_images=4)
    assert is_dataset_table(table) and len(open_dataset_table(table).segments([1, 12])["image_id"].unique()) == 2
    convert(table, back)
    import fsspec

    fs = fsspec.filesystem("s3")
    fs.get(f"{s3_bucket}/coco", str(tmp_path / "coco"), recursive=True)
    assert _canonical(tmp_path / "coco" / "panoptic_val.json") == _canonical(src)


def _break(tmp_path, kind, edit):
    src = tmp_path / f"{kind}.json"
    data = _panoptic_file(src) if kind == "panoptic" else _instances_file(src)
    edit(data, src.parent / src.stem)
    src.write_text(json.dumps(data))
    return src


def _fake_version(tmp_path):
    table = tmp_path / "table"
    convert(str(_break(tmp_path, "instances", lambda d, f: None)), str(table))
    images = pq.read_table(table / "images.parquet")
    pq.write_table(images.replace_schema_metadata({**images.schema.metadata, b"segpipe.version": b"2"}),
                   table / "images.parquet")
    return table


def _png_with_stray_id(data, folder):
    ids = decode_panoptic_png((folder / "p2.png").read_bytes(), "")
    ids[0, 0] = 77
    (folder / "p2.png").write_bytes(encode_panoptic_png(ids))


@pytest.mark.parametrize("make, message", [
    (lambda t: _break(t, "panoptic", _png_with_stray_id), "image 9: segment 77: .*p2.png has 1 pixels of this id, which segments_info lacks"),
    (lambda t: _break(t, "panoptic", lambda d, f: (f / "p1.png").unlink()), "image 4: .*p1.png: no such file"),
    (lambda t: _break(t, "panoptic", lambda d, f: d["annotations"][0]["segments_info"].append(
        dict(d["annotations"][0]["segments_info"][0]))), "image 4: segment 70000: duplicate segment id"),
    (lambda t: _break(t, "panoptic", lambda d, f: d["annotations"][1].update(image_id=5)),
     "image 5: annotation's image_id is not in 'images'"),
    (lambda t: _break(t, "instances", lambda d, f: d["annotations"][1].update(id=5)), "image 1: annotation 5: duplicate annotation id"),
    (lambda t: _break(t, "instances", lambda d, f: d["annotations"][0].update(image_id=8)), "annotation 5: image_id is not in 'images'"),
    (lambda t: _break(t, "instances", lambda d, f: d["images"].append(dict(d["images"][0]))), "image 3: duplicate image id"),
    (lambda t: _break(t, "instances", lambda d, f: d["annotations"][0].update(segmentation=[[1, 2]])),
     "image 2: annotation 5: malformed segmentation"),
    (lambda t: _break(t, "instances", lambda d, f: d["annotations"][0].update(iscrowd=True)), "annotation 5: 'iscrowd' is True"),
    (lambda t: t / "nothing.json", "nothing.json: no such file"),
    (_fake_version, "images.parquet: images table version '2'; this segpipe reads versions up to 1"),
])
def test_bad_inputs_are_one_line_and_exit_2(tmp_path, make, message):
    src = make(tmp_path)
    out = tmp_path / ("out.json" if src.is_dir() else "out")
    result = CliRunner().invoke(app, ["convert", str(src), str(out)])
    assert result.exit_code == 2, result.output
    lines = result.output.strip().splitlines()
    assert len(lines) == 1 and "Traceback" not in result.output
    assert re.search(message, lines[0]), lines[0]


def test_opening_something_else_is_an_error(tmp_path):
    with pytest.raises(SegpipeError, match="not a segpipe dataset table"):
        open_dataset_table(str(tmp_path / "missing"))
    table = tmp_path / "table"
    convert(str(_break(tmp_path, "instances", lambda d, f: None)), str(table))
    shutil.copy(table / "images.parquet", table / "segments.parquet")
    with pytest.raises(SegpipeError, match="segments.parquet: not a segpipe segments table"):
        open_dataset_table(str(table))
    (table / "segments.parquet").write_bytes(b"not parquet")
    with pytest.raises(SegpipeError, match="segments.parquet: cannot be read as Parquet"):
        open_dataset_table(str(table))
    # Two writes' files side by side (a conversion that died between its two commits): refused, not mixed.
    convert(str(_break(tmp_path, "instances", lambda d, f: None)), str(tmp_path / "again"))
    shutil.copy(tmp_path / "again" / "segments.parquet", table / "segments.parquet")
    with pytest.raises(SegpipeError, match="come from two different writes"):
        open_dataset_table(str(table))


def test_convert_has_help():
    result = CliRunner().invoke(app, ["convert", "--help"])
    assert result.exit_code == 0 and "segpipe convert" in result.stdout and "--row-group-images" in result.stdout
