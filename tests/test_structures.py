"""Exact conversions: mask <-> RLE, id map <-> panoptic PNG, predictions <-> Arrow / Parquet."""

import io

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from PIL import Image
from pycocotools import mask as mask_utils

from pipeline.errors import SegpipeError
from pipeline.schemas import arrow_schema
from pipeline.structures import (
    ImagePrediction, Rle, Segment, decode_panoptic_png, encode_panoptic_png, ids_to_rgb,
    predictions_from_arrow, predictions_to_arrow, rgb_to_ids, rle_counts,
)

SIZES = [(1, 1), (1, 9), (7, 1), (2, 3), (33, 17), (129, 257), (480, 640)]


def _runs(mask: np.ndarray) -> list[int]:
    """Column-major run lengths starting with zeros, computed independently of pycocotools."""
    flat = mask.ravel(order="F").astype(np.int8)
    bounds = np.concatenate([[0], np.flatnonzero(np.diff(flat)) + 1, [flat.size]])
    runs = np.diff(bounds).tolist()
    return [0, *runs] if flat[0] else runs


def _masks(rng):
    for h, w in SIZES:
        yield np.zeros((h, w), bool)
        yield np.ones((h, w), bool)
        for density in (0.02, 0.5, 0.98):
            yield rng.random((h, w)) < density
        blob = np.zeros((h, w), bool)
        blob[h // 4: 3 * h // 4 + 1, w // 3: 2 * w // 3 + 1] = True
        yield blob


def test_rle_round_trip_is_bit_exact_on_random_and_edge_masks():
    rng = np.random.default_rng(0)
    for mask in _masks(rng):
        rle = Rle.from_mask(mask)
        assert (rle.height, rle.width) == mask.shape
        np.testing.assert_array_equal(rle.to_mask(), mask)
        assert rle_counts(rle.counts) == _runs(mask)
        assert rle.area() == int(mask.sum())


def test_rle_box_is_tight_and_empty_mask_has_zero_box():
    mask = np.zeros((10, 12), bool)
    mask[2:5, 3:9] = True
    assert Rle.from_mask(mask).bbox() == (3.0, 2.0, 6.0, 3.0)
    empty = Rle.from_mask(np.zeros((5, 5), bool))
    assert (empty.area(), empty.bbox()) == (0, (0.0, 0.0, 0.0, 0.0))


def test_rle_from_coco_reads_uncompressed_counts_and_polygons():
    rng = np.random.default_rng(1)
    mask = rng.random((31, 45)) < 0.3
    uncompressed = {"size": [31, 45], "counts": _runs(mask)}
    assert Rle.from_coco(uncompressed, 31, 45) == Rle.from_mask(mask)
    square = [[2.0, 2.0, 10.0, 2.0, 10.0, 8.0, 2.0, 8.0]]
    expected = mask_utils.decode(mask_utils.merge(mask_utils.frPyObjects(square, 20, 20))).astype(bool)
    np.testing.assert_array_equal(Rle.from_coco(square, 20, 20).to_mask(), expected)
    compressed = Rle.from_mask(mask).to_coco()
    assert Rle.from_coco(compressed, 31, 45).counts == compressed["counts"]
    # The compressed string is COCO's: pycocotools decodes it to the mask (not only segpipe reads it back).
    coco = {"size": compressed["size"], "counts": compressed["counts"].encode()}
    np.testing.assert_array_equal(mask_utils.decode(coco).astype(bool), mask)


@pytest.mark.parametrize("counts, reason", [
    ("ab\x1f", "outside the RLE alphabet"),  # below chr(48)
    ("\x7f", "outside the RLE alphabet"),  # above chr(48 + 63)
    ("l", "ends inside a run"),  # 'l' = 48 + 60: continuation bit set, nothing follows
    ("O", "negative length"),  # 'O' = 48 + 31: sign bit set, so -1
    ("01O", "negative length"),  # third run is a delta (-1) on the first (0)
])
def test_rle_counts_rejects_malformed_strings(counts, reason):
    with pytest.raises(ValueError, match=reason):
        rle_counts(counts)


def test_panoptic_ids_map_to_rgb_as_coco_defines():
    ids = np.array([[0, 1 + 256 * 2 + 256**2 * 3, 256**3 - 1]])
    np.testing.assert_array_equal(ids_to_rgb(ids), [[[0, 0, 0], [1, 2, 3], [255, 255, 255]]])
    np.testing.assert_array_equal(rgb_to_ids(ids_to_rgb(ids)), ids)
    with pytest.raises(ValueError):
        ids_to_rgb(np.array([[256**3]]))


@pytest.mark.parametrize("height, width", SIZES)
def test_panoptic_png_round_trip_is_bit_exact_with_ids_past_65535(height, width):
    rng = np.random.default_rng(height * 1000 + width)
    palette = np.array([0, 1, 255, 256, 65535, 65536, 70000, 2**24 - 1])
    ids = palette[rng.integers(0, len(palette), (height, width))]
    data = encode_panoptic_png(ids)
    np.testing.assert_array_equal(decode_panoptic_png(data, "x.png"), ids)
    # The PNG holds exactly the RGB that panopticapi's rgb2id reads back.
    rgb = np.asarray(Image.open(io.BytesIO(data)), dtype=np.uint32)
    np.testing.assert_array_equal(rgb[..., 0] + 256 * rgb[..., 1] + 256 * 256 * rgb[..., 2], ids)


@pytest.mark.parametrize("mode, kind", [("L", "8-bit grayscale"), ("RGBA", "8-bit RGBA"), ("P", r"\d+-bit palette"),
                                        ("I;16", "16-bit grayscale"), ("1", "1-bit grayscale")])
def test_decoding_a_png_that_is_not_rgb_names_the_file_and_kind(mode, kind):
    buffer = io.BytesIO()
    Image.new(mode, (4, 3)).save(buffer, format="PNG")
    with pytest.raises(SegpipeError, match=rf"^a/b\.png: is a {kind} PNG; a COCO panoptic PNG is 8-bit RGB"):
        decode_panoptic_png(buffer.getvalue(), "a/b.png")


def test_decoding_garbage_or_a_jpeg_is_a_clear_error():
    with pytest.raises(SegpipeError, match="cannot be read as a PNG"):
        decode_panoptic_png(b"not an image", "x.png")
    whole = encode_panoptic_png(np.arange(64 * 64).reshape(64, 64))
    with pytest.raises(SegpipeError, match="x.png: cannot be read as a PNG"):
        decode_panoptic_png(whole[: len(whole) // 2], "x.png")  # truncated
    buffer = io.BytesIO()
    Image.new("RGB", (4, 4)).save(buffer, format="JPEG")
    with pytest.raises(SegpipeError, match="is a JPEG file, not a PNG"):
        decode_panoptic_png(buffer.getvalue(), "x.png")


def _prediction(rng, image_id: int, height: int, width: int) -> ImagePrediction:
    ids = np.zeros((height, width), np.uint32)
    ids[: height // 2] = 70000
    ids[height // 2:, : width // 3] = 5
    ids[height - 3:, width - 4:] = 2**24 - 1
    info = [{"id": 70000, "category_id": 187, "iscrowd": 0},
            {"id": 5, "category_id": 1, "iscrowd": 1},
            {"id": 2**24 - 1, "category_id": 3, "iscrowd": 0, "score": float(rng.random())}]
    return ImagePrediction.from_panoptic(image_id, f"{image_id:012d}.jpg", ids, info)


def test_image_prediction_panoptic_round_trip_measures_area_and_box():
    rng = np.random.default_rng(2)
    prediction = _prediction(rng, 3, 37, 53)
    ids, info = prediction.to_panoptic()
    back = ImagePrediction.from_panoptic(3, prediction.file_name, ids, info)
    assert (back.height, back.width) == (37, 53)
    fields = lambda p: [(s.id, s.category_id, s.rle, s.area, s.bbox, s.iscrowd) for s in p.segments]
    assert fields(back) == fields(prediction)
    assert info[2] == {"id": 2**24 - 1, "category_id": 3, "iscrowd": 0, "bbox": [49, 34, 4, 3], "area": 12}
    assert info[1]["iscrowd"] == 1 and info[1]["area"] == (37 - 18) * 17


def test_to_panoptic_refuses_overlapping_segments():
    mask = np.ones((4, 4), bool)
    overlapping = ImagePrediction(1, "a.jpg", 4, 4, (Segment.from_mask(1, 1, mask), Segment.from_mask(2, 1, mask)))
    with pytest.raises(ValueError, match="overlaps"):
        overlapping.to_panoptic()


def test_arrow_round_trip_through_parquet_keeps_every_value():
    rng = np.random.default_rng(3)
    predictions = [_prediction(rng, i, 20 + i, 30 + 2 * i) for i in range(1, 6)]
    predictions.append(ImagePrediction(9, "tiny.jpg", 1, 1, (
        Segment.from_mask(1, 44, np.ones((1, 1), bool), score=0.1 + 0.2),  # 0.30000000000000004
        Segment.from_mask(2, 44, np.zeros((1, 1), bool), score=1e-300))))
    table = predictions_to_arrow(predictions, run_id="run-1", model="unit")
    assert table.schema == arrow_schema("predictions")
    assert table.num_rows == sum(len(p.segments) for p in predictions)
    buffer = io.BytesIO()
    pq.write_table(table, buffer)
    back = pq.read_table(io.BytesIO(buffer.getvalue()))
    assert predictions_from_arrow(back) == predictions
    rechunked = pa.Table.from_batches(table.to_batches(max_chunksize=4))  # many record batches
    assert rechunked.column("bbox").num_chunks > 1
    assert predictions_from_arrow(rechunked) == predictions
    assert set(back.column("run_id").to_pylist()) == {"run-1"}


def test_predictions_table_missing_columns_is_a_user_error():
    table = predictions_to_arrow([], run_id="r", model="m").drop_columns(["rle"])
    with pytest.raises(SegpipeError, match="lacks columns \\['rle'\\]"):
        predictions_from_arrow(table)
