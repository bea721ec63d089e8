"""`segpipe infer` on a real local Ray cluster: outputs, GPU pinning, resume after SIGKILL, bad images."""

import io
import json
import pickle
import struct
import subprocess
import sys
import tarfile
import time
import zlib
from collections import Counter
from dataclasses import replace
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest
from PIL import Image

from pipeline.errors import SegpipeError
from pipeline.fusion import FusionConfig
from pipeline.infer import InferConfig, run
from pipeline.models import ModelSettings
from pipeline.synth import categories

SMALL = ModelSettings(random_weights=True, seed=0, categories=tuple(categories()), score_threshold=0.05,
                      fusion=FusionConfig(stuff_area_threshold=64))


@pytest.fixture(scope="module")
def cluster():
    """One local Ray for the module, with 2 fake GPUs: on a CPU machine Ray hands out ids 0 and 1."""
    import ray

    ray.init(num_cpus=2, num_gpus=2, include_dashboard=False, log_to_driver=False)
    yield
    ray.shutdown()


def _in_process(model: str, settings: ModelSettings, shards: str, batch_size: int = 4) -> list:
    """The model's predictions for every image of the shards, made here without Ray: per shard, in batches of
    `batch_size`, with one torch thread, as the run's actor does (so the same bits)."""
    import torch

    from pipeline.infer import image_id_for
    from pipeline.io.decode import decode_image
    from pipeline.io.shards import list_shards, read_shard
    from pipeline.models import load_model

    adapter, threads = load_model(model, settings), torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        predictions = []
        for shard in list_shards(shards):
            records = list(read_shard(shard))
            for i in range(0, len(records), batch_size):
                batch = records[i:i + batch_size]
                predictions += adapter.predict([decode_image(r.data) for r in batch],
                                               [image_id_for(r.key) for r in batch], [r.key for r in batch])
        return predictions
    finally:
        torch.set_num_threads(threads)


def _files(root: Path) -> dict[str, bytes]:
    return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*"))
            if p.is_file() and not p.name.startswith(".") and p.name != "summary.json"}


def test_panoptic_run_writes_parquet_coco_panoptic_and_results_that_evaluate(cluster, dataset, tmp_path):
    import duckdb
    from pycocotools.coco import COCO
    from pycocotools.cocoeval import COCOeval

    from pipeline.evaluate.ap import evaluate_ap
    from pipeline.evaluate.pq import evaluate_pq
    from pipeline.io.tables import parquet_files, read_predictions
    from pipeline.structures import decode_panoptic_png
    from pipeline.validate import validate

    out = tmp_path / "out"
    summary = run(InferConfig(input=str(dataset / "shards"), out=str(out), model="segpipe_small", settings=SMALL))
    assert (summary.images, summary.failed, summary.shards) == (12, 0, 3)
    gt = json.loads((dataset / "annotations" / "panoptic_val.json").read_text())
    pan = json.loads((out / "panoptic_pred.json").read_text())
    assert sorted(im["id"] for im in pan["images"]) == sorted(im["id"] for im in gt["images"])
    assert [c["id"] for c in pan["categories"]] == [c["id"] for c in categories()]
    report = validate(str(out / "panoptic_pred.json"))
    assert report.kind == "panoptic" and report.problems == [] and report.images == 12
    # The predictions table: one row per segment, readable by pyarrow and DuckDB alike.
    table = pq.read_table(out / "predictions")
    assert table.num_rows == summary.segments == sum(len(a["segments_info"]) for a in pan["annotations"])
    parts = str(out / "predictions" / "*.parquet")
    assert duckdb.sql(f"select count(*), count(distinct image_id) from '{parts}'").fetchall() == [(summary.segments, 12)]
    # What the model gives for the same images without Ray, segment for segment, and PNG for PNG.
    expected = _in_process("segpipe_small", SMALL, str(dataset / "shards"))
    assert read_predictions(parquet_files(str(out / "predictions"))) == expected and summary.segments > 12
    for prediction in expected:
        png = (out / "panoptic_pred" / f"{prediction.image_id:012d}.png").read_bytes()
        np.testing.assert_array_equal(decode_panoptic_png(png, "pred"), prediction.to_panoptic()[0])
    results = json.loads((out / "instances_pred_results.json").read_text())
    things = {c["id"] for c in categories(True)}
    assert results and {r["category_id"] for r in results} <= things
    assert len(results) == sum(1 for a in pan["annotations"] for s in a["segments_info"] if s["category_id"] in things)
    pq_result = evaluate_pq(str(dataset / "annotations" / "panoptic_val.json"), str(out / "panoptic_pred.json"))
    # Every non-crowd ground-truth segment is matched or missed once: counted from the GT file, per class.
    truth = Counter(s["category_id"] for a in gt["annotations"] for s in a["segments_info"] if not s["iscrowd"])
    assert {int(c): f["tp"] + f["fn"] for c, f in pq_result["per_class"].items()} == {
        c["id"]: truth[c["id"]] for c in categories()}
    assert sum(f["tp"] + f["fp"] for f in pq_result["per_class"].values()) <= summary.segments
    assert evaluate_pq(str(dataset / "annotations" / "panoptic_val.json"), str(out / "predictions")) == pq_result
    ap_result = evaluate_ap(str(dataset / "annotations" / "instances_val.json"), str(out / "instances_pred_results.json"))
    coco = COCO(str(dataset / "annotations" / "instances_val.json"))
    reference = COCOeval(coco, coco.loadRes(str(out / "instances_pred_results.json")), "segm")
    reference.evaluate()
    reference.accumulate()
    reference.summarize()
    assert ap_result["stats"] == pytest.approx(reference.stats.tolist(), abs=1e-12)
    written = json.loads((out / "summary.json").read_text())
    assert written["images"] == 12 and written["outputs"]["panoptic"] == str(out / "panoptic_pred.json")


def test_two_gpu_actors_are_pinned_to_distinct_devices_and_run_on_cpu_without_cuda(cluster, dataset, tmp_path):
    # Mask R-CNN, so that a row takes longer on an actor than the next takes to arrive: rows queue up and
    # Ray Data hands them to the less busy actor (a model faster than the reads lets one actor take them all).
    from ray.data import DataContext

    overridden = ("enable_progress_bars", "print_on_execution_start", "enable_auto_log_stats", "target_max_block_size",
                  "wait_for_min_actors_s")
    before = {name: getattr(DataContext.get_current(), name) for name in overridden}
    settings = ModelSettings(random_weights=True, min_size=96, max_size=128, score_threshold=0.3)
    summary = run(InferConfig(input=str(dataset / "val"), out=str(tmp_path / "out"), model="maskrcnn_resnet50_fpn",
                              settings=settings, batch_size=1, actors=2, gpus_per_actor=1, files_per_shard=1))
    assert len(summary.actors) == 2
    assert sorted(a["cuda_visible_devices"] for a in summary.actors) == ["0", "1"]
    assert {a["device"] for a in summary.actors} == {"cpu"}  # CUDA is absent here: the model falls back
    assert sum(a["images"] for a in summary.actors) == 12 and all(a["images"] > 0 for a in summary.actors)
    # The run's Ray Data settings were its own: the process-wide context is as it found it.
    assert {name: getattr(DataContext.get_current(), name) for name in overridden} == before
    assert before["target_max_block_size"] != 1  # else the comparison would not show a leak of the run's 1


def test_a_request_the_cluster_cannot_place_fails_at_once(cluster, dataset, tmp_path):
    start = time.perf_counter()
    with pytest.raises(SegpipeError, match="needs 3 GPUs; the cluster has 2"):
        run(InferConfig(input=str(dataset / "val"), out=str(tmp_path / "a"), model="segpipe_small", settings=SMALL,
                        actors=3, gpus_per_actor=1))
    with pytest.raises(SegpipeError, match="do not fit on 2 CPUs"):
        run(InferConfig(input=str(dataset / "val"), out=str(tmp_path / "b"), model="segpipe_small", settings=SMALL,
                        actors=2, cpus_per_actor=1.0))
    assert time.perf_counter() - start < 30


def test_instance_model_writes_results_and_table_but_no_panoptic_files(cluster, dataset, tmp_path):
    # Threshold 0: random weights detect next to nothing above 0.3, and an empty result would agree with anything.
    settings = ModelSettings(random_weights=True, min_size=96, max_size=128, score_threshold=0.0)
    shard = dataset / "shards" / "val-00002.tar"
    out = tmp_path / "out"
    summary = run(InferConfig(input=str(shard), out=str(out), model="maskrcnn_resnet50_fpn", settings=settings))
    assert summary.images == 2 and not (out / "panoptic_pred.json").exists()
    results = json.loads((out / "instances_pred_results.json").read_text())
    assert len(results) == summary.segments == pq.read_table(out / "predictions").num_rows
    assert {r["image_id"] for r in results} == {11, 12}  # the shard's two images, both with detections
    expected = _in_process("maskrcnn_resnet50_fpn", settings, str(shard))
    assert results == [r for p in expected for r in p.to_coco_results()]


def test_flip_check_gives_each_segment_its_agreement_with_the_mirrored_image_and_every_one_its_stability(
        cluster, dataset, tmp_path):
    from pipeline.io.decode import decode_image
    from pipeline.io.shards import list_shards, read_shard
    from pipeline.io.tables import parquet_files, read_predictions
    from pipeline.models import load_model
    from pipeline.signals import flip_agreement

    shard = str(dataset / "shards" / "val-00001.tar")
    out = tmp_path / "out"
    run(InferConfig(input=shard, out=str(out), model="segpipe_small", settings=SMALL, flip_check=True))
    table = pq.read_table(out / "predictions")
    stability, flip = table.column("stability").to_pylist(), table.column("flip_iou").to_pylist()
    assert table.num_rows > 4 and all(0 <= v <= 1 for v in stability + flip) and 0 < sum(flip) < len(flip)
    # The same numbers made here: the shard's images and their mirrors through the model in the actor's batch
    # (4 images, one torch thread: the same bits), then flip_agreement.
    import torch

    from pipeline.infer import image_id_for

    adapter, threads = load_model("segpipe_small", SMALL), torch.get_num_threads()
    records = list(read_shard(list_shards(shard)[0]))
    images, ids, keys = [decode_image(r.data) for r in records], [image_id_for(r.key) for r in records], [r.key for r in records]
    torch.set_num_threads(1)
    plain, mirrored = [], []
    try:
        for i in range(0, len(images), 4):
            plain += adapter.predict(images[i:i + 4], ids[i:i + 4], keys[i:i + 4])
            mirrored += adapter.predict([np.ascontiguousarray(im[:, ::-1]) for im in images[i:i + 4]], ids[i:i + 4],
                                        keys[i:i + 4])
    finally:
        torch.set_num_threads(threads)
    got = {p.image_id: p for p in read_predictions(parquet_files(str(out / "predictions")))}
    for expected, flipped in zip(plain, mirrored):
        assert [s.flip_iou for s in got[expected.image_id].segments] == flip_agreement(expected, flipped)
        assert [s.stability for s in got[expected.image_id].segments] == [s.stability for s in expected.segments]


def test_weights_come_from_the_checkpoint_with_its_categories_and_a_bad_one_fails_before_ray(cluster, dataset, tmp_path):
    import torch

    from pipeline.io.tables import parquet_files, read_predictions
    from pipeline.models import load_model

    # Seed 1: a run that ignored the checkpoint would build seed 0's random weights, and differ.
    source = replace(SMALL, seed=1)
    model = load_model("segpipe_small", source)
    torch.save({"model": model.module.state_dict(), "categories": list(categories())}, tmp_path / "small.pt")
    settings = ModelSettings(weights=str(tmp_path / "small.pt"), fusion=SMALL.fusion)
    shard = str(dataset / "shards" / "val-00002.tar")
    summary = run(InferConfig(input=shard, out=str(tmp_path / "out"), model="segpipe_small", settings=settings))
    pan = json.loads((tmp_path / "out" / "panoptic_pred.json").read_text())
    assert summary.images == 2 and [c["id"] for c in pan["categories"]] == [c["id"] for c in categories()]
    expected = _in_process("segpipe_small", source, shard)
    assert read_predictions(parquet_files(str(tmp_path / "out" / "predictions"))) == expected
    assert expected != _in_process("segpipe_small", replace(SMALL, seed=0), shard)
    torch.save({"model": {"stem.0.0.weight": torch.zeros(1)}}, tmp_path / "bad.pt")
    start = time.perf_counter()
    with pytest.raises(SegpipeError, match="bad.pt: does not fit segpipe_small"):
        run(InferConfig(input=str(dataset / "val"), out=str(tmp_path / "bad"), model="segpipe_small",
                        settings=ModelSettings(weights=str(tmp_path / "bad.pt"))))
    assert time.perf_counter() - start < 10 and not (tmp_path / "bad").exists()


def _png(width: int, height: int, bit_depth: int = 8, color_type: int = 2, data: bytes = b"") -> bytes:
    """A PNG made by hand: its header can promise any size (the decoder must refuse before allocating)."""
    def chunk(kind: bytes, body: bytes) -> bytes:
        return struct.pack(">I", len(body)) + kind + body + struct.pack(">I", zlib.crc32(kind + body))
    header = struct.pack(">IIBBBBB", width, height, bit_depth, color_type, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", zlib.compress(data)) + chunk(b"IEND", b"")


def _encode(image: Image.Image, fmt: str) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format=fmt)
    return buffer.getvalue()


def test_bad_images_are_converted_or_recorded_and_the_run_goes_on(cluster, dataset, tmp_path):
    from typer.testing import CliRunner

    from pipeline.cli import app

    folder = tmp_path / "images"
    folder.mkdir()
    good = sorted((dataset / "val").glob("*.jpg"))[:2]
    for path in good:
        (folder / path.name).write_bytes(path.read_bytes())
    rgb = np.asarray(Image.open(good[0]).convert("RGB"))
    converted = {
        "gray.png": _encode(Image.fromarray(rgb[..., 0], "L"), "PNG"),
        "rgba.png": _encode(Image.fromarray(np.dstack([rgb, np.full(rgb.shape[:2], 128, np.uint8)]), "RGBA"), "PNG"),
        "cmyk.jpg": _encode(Image.fromarray(rgb).convert("CMYK"), "JPEG"),
        "deep.png": _encode(Image.fromarray(rgb[..., 0].astype(np.uint16) * 257), "PNG"),
    }
    broken = {
        "empty.jpg": (b"", "empty file"),
        "truncated.jpg": (good[0].read_bytes()[:600], "truncated"),
        "text.png": (b"this is not an image\n" * 10, "not an image"),
        "huge.png": (_png(100_000, 100_000), "too large"),
    }
    for name, data in converted.items():
        (folder / name).write_bytes(data)
    for name, (data, _) in broken.items():
        (folder / name).write_bytes(data)
    out = tmp_path / "out"
    result = CliRunner().invoke(app, ["infer", "--input", str(folder), "--model", "segpipe_small", "--random-weights",
                                      "--categories", str(dataset / "annotations" / "panoptic_val.json"),
                                      "--out", str(out), "--stuff-area", "64"])
    assert result.exit_code == 1, result.output
    assert "6 images" in result.output and "4 failed" in result.output
    errors = pq.read_table(out / "errors.parquet").to_pylist()
    assert sorted(e["image"] for e in errors) == sorted(broken)
    for error in errors:
        assert broken[error["image"]][1] in error["reason"] and error["shard"] == f"file://{folder}"
    pan = json.loads((out / "panoptic_pred.json").read_text())
    assert sorted(im["file_name"] for im in pan["images"]) == sorted([p.name for p in good] + list(converted))
    assert all((im["height"], im["width"]) == rgb.shape[:2] for im in pan["images"])


def test_a_shard_that_breaks_off_is_an_error_row_not_a_failed_run(cluster, dataset, tmp_path):
    shards = tmp_path / "shards"
    shards.mkdir()
    (shards / "a.tar").write_bytes((dataset / "shards" / "val-00002.tar").read_bytes())
    whole = (dataset / "shards" / "val-00000.tar").read_bytes()
    cut = len(whole) // 2
    (shards / "b.tar").write_bytes(whole[:cut])
    with tarfile.open(fileobj=io.BytesIO(whole)) as tar:
        members = tar.getmembers()
    complete = [m.name for m in members if m.offset_data + m.size <= cut]
    assert len(complete) == 2 and members[2].offset_data < cut < members[2].offset_data + members[2].size  # mid third
    summary = run(InferConfig(input=str(shards), out=str(tmp_path / "out"), model="segpipe_small", settings=SMALL))
    errors = pq.read_table(tmp_path / "out" / "errors.parquet").to_pylist()
    assert len(errors) == 1 and errors[0]["reason"].startswith("shard unreadable")
    assert errors[0]["shard"].endswith("b.tar") and errors[0]["image"] == "(shard after 2 images)"
    assert (summary.images, summary.failed) == (4, 1)  # a.tar's 2, and b.tar's 2 before the cut
    pan = json.loads((tmp_path / "out" / "panoptic_pred.json").read_text())
    with tarfile.open(shards / "a.tar") as tar:
        assert sorted(im["file_name"] for im in pan["images"]) == sorted(tar.getnames() + complete)


def test_a_run_killed_midway_resumes_to_the_same_outputs(cluster, tmp_path, kill_session):
    """SIGKILL to every process of the run's session (driver, raylet, GCS, workers), then a rerun."""
    from pipeline.synth import SynthConfig, write_dataset

    write_dataset(str(tmp_path / "data"), SynthConfig(images=24, split="val", seed=3, height=512, width=512))
    images, gt = tmp_path / "data" / "val", tmp_path / "data" / "annotations" / "panoptic_val.json"
    killed = tmp_path / "killed"
    process = subprocess.Popen(
        [sys.executable, "-m", "pipeline", "infer", "--input", str(images), "--model", "segpipe_small",
         "--random-weights", "--categories", str(gt), "--files-per-shard", "2", "--batch-size", "1",
         "--stuff-area", "64", "--out", str(killed)],
        start_new_session=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    parts = killed / "parts"
    deadline = time.monotonic() + 240
    while not (parts.exists() and any(p.suffix == ".json" for p in parts.iterdir())):
        assert process.poll() is None, "the run ended before it could be killed"
        assert time.monotonic() < deadline, "no shard committed within 240 s"
        time.sleep(0.02)
    assert kill_session(process.pid) >= 4  # the driver, GCS, raylet and at least one worker
    process.wait()
    done_before = len([p for p in parts.iterdir() if p.suffix == ".json"])
    assert 1 <= done_before < 12, "the kill must land midway for this test to mean anything"
    assert not (killed / "panoptic_pred.json").exists()

    settings = ModelSettings(random_weights=True, categories=tuple(json.loads(gt.read_text())["categories"]),
                             fusion=FusionConfig(stuff_area_threshold=64))
    config = dict(input=str(images), model="segpipe_small", settings=settings, files_per_shard=2, batch_size=1)
    resumed = run(InferConfig(out=str(killed), **config))
    assert resumed.shards_resumed == done_before and resumed.images == 24
    unbroken = run(InferConfig(out=str(tmp_path / "unbroken"), **config))
    assert unbroken.shards_resumed == 0
    assert _files(killed) == _files(tmp_path / "unbroken")  # every byte: tables, PNGs, JSON exports, markers
    pan = json.loads((killed / "panoptic_pred.json").read_text())
    assert sorted(im["id"] for im in pan["images"]) == list(range(1, 25))  # no image twice, none missing

    with pytest.raises(SegpipeError, match="holds a run with other model"):
        run(InferConfig(out=str(killed), **{**config, "model": "maskrcnn_resnet50_fpn"}))


def test_bench_infer_measures_the_pipeline_against_the_raw_model_on_the_same_images(tmp_path):
    from pipeline.bench_infer import run as bench

    start = time.perf_counter()
    report = bench(tmp_path / "data", images=16, height=64, width=64, model="segpipe_small", weights=None,
                   batch_size=4, threads=1, repeat=1, actor_counts=[1], out=tmp_path / "bench.json", echo=lambda line: None)
    elapsed = time.perf_counter() - start
    (pipe,), (raw,) = report["runs"]["pipeline-1"], report["runs"]["raw"]
    assert raw["images"] == pipe["images"] == 16
    # The pipeline run's outputs are on disk: its segment count is the table's rows.
    rows = pq.read_table(tmp_path / "data" / "out" / "predictions").num_rows
    assert pipe["segments"] == rows > 0 and report["segments_per_image"] == rows / 16
    # Each run was timed inside this call, Ray's own start and stop measured and left out.
    assert 0 < raw["seconds"] and 0 < pipe["ray_s"] and 0 < pipe["seconds"]
    assert raw["seconds"] + pipe["seconds"] + pipe["ray_s"] < elapsed
    for run_ in (raw, pipe):
        assert run_["images_per_s"] == pytest.approx(16 / run_["seconds"])
    # Same images, so the ratio of rates is the ratio of times; the pipeline does the raw forward and more
    # (reading, decoding, the model's load, post-processing, writing) on the same one thread, so it is slower.
    efficiency = report["efficiency"]["pipeline-1"]
    assert efficiency == pytest.approx(raw["seconds"] / pipe["seconds"]) and 0 < efficiency < 1
    assert report["efficiency_paired"]["pipeline-1"] == pytest.approx(efficiency)  # one repeat: one pair
    assert json.loads((tmp_path / "bench.json").read_text()) == json.loads(json.dumps(report))


def test_rows_hold_whole_batches_and_end_early_for_big_images(tmp_path, monkeypatch):
    from pipeline import infer
    from pipeline.io.shards import list_shards

    folder = tmp_path / "images"
    folder.mkdir()
    for i in range(10):
        Image.new("RGB", (64, 48), (i, 0, 0)).save(folder / f"{i:012d}.png")
    (folder / "000000000099.png").write_bytes(b"not an image")  # sorts last: an error item in the last row
    shards = list_shards(str(folder), 64)

    def rows(batch_size: int) -> list[dict]:
        return [{**row, "payload": pickle.loads(row["payload"])}
                for row in infer._read({"shard": 0}, shards=shards, batch_size=batch_size, image_info=None)]

    (whole,) = rows(2)  # 10 images of 2 batches each fit one row
    assert whole["final"] and len(whole["payload"].images) == 10 and len(whole["payload"].items) == 11
    monkeypatch.setattr(infer, "ROW_BYTES", 3 * 64 * 48 * 3)  # three images' pixels: a row ends at the next batch
    cut = rows(2)
    assert [len(r["payload"].images) for r in cut] == [4, 4, 2] and [r["chunk"] for r in cut] == [0, 1, 2]
    assert [r["final"] for r in cut] == [False, False, True]
    items = [item for r in cut for item in r["payload"].items]
    assert [item.position for item in items] == list(range(11))
    assert [(item.image_id, item.height, item.width) for item in items[:10]] == [(i, 48, 64) for i in range(10)]
    assert items[-1].error is not None and items[-1].image_id == 0 and items[-1].key.endswith("000000000099.png")
