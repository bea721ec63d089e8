"""segpipe report: contents against hand counts, the comparison against the evaluators, the page in a real browser."""

import json
import re
import shutil
import subprocess

import numpy as np
import pytest

from pipeline.errors import SegpipeError
from pipeline.evaluate.ap import evaluate_ap
from pipeline.evaluate.pq import evaluate_pq
from pipeline.io.fs import write_bytes, write_json
from pipeline.report import ReportConfig, run
from pipeline.report import compare as compare_module
from pipeline.report.compare import poisson_weights
from pipeline.structures import encode_panoptic_png
from pipeline.synth import perturb_instances, write_perturbed_panoptic

CATEGORIES = [{"id": 1, "name": "person", "isthing": 1}, {"id": 2, "name": "sky", "isthing": 0}]


def _panoptic(root, name: str, maps: list[np.ndarray], segments: list[list[dict]]) -> str:
    """A COCO panoptic JSON + PNG folder from id maps; areas measured from the maps."""
    annotations = []
    for k, (ids, infos) in enumerate(zip(maps, segments), start=1):
        write_bytes(str(root / name / f"{k}.png"), encode_panoptic_png(ids))
        infos = [{**s, "area": int((ids == s["id"]).sum()), "bbox": [0, 0, 1, 1]} for s in infos]
        annotations.append({"image_id": k, "file_name": f"{k}.png", "segments_info": infos})
    images = [{"id": k, "file_name": f"{k}.jpg", "height": 4, "width": 6} for k in range(1, len(maps) + 1)]
    write_json(str(root / f"{name}.json"), {"images": images, "annotations": annotations, "categories": CATEGORIES})
    return str(root / f"{name}.json")


@pytest.fixture
def tiny(tmp_path):
    """Two 4x6 images. Image 1: a person of 6 pixels, sky of 12, 6 VOID. Image 2: a crowd of 4 people, a person
    of 2 pixels, sky of 10, 8 VOID. Predictions: exact; compared: image 1's person missed."""
    one = np.zeros((4, 6), np.uint32)
    one[:2, :3] = 10
    one[2:, :] = 20
    two = np.zeros((4, 6), np.uint32)
    two[0, :4] = 30
    two[1, :2] = 31
    two[2:, :5] = 40
    gt_segments = [[{"id": 10, "category_id": 1, "iscrowd": 0}, {"id": 20, "category_id": 2, "iscrowd": 0}],
                   [{"id": 30, "category_id": 1, "iscrowd": 1}, {"id": 31, "category_id": 1, "iscrowd": 0},
                    {"id": 40, "category_id": 2, "iscrowd": 0}]]
    gt = _panoptic(tmp_path, "gt", [one, two], gt_segments)
    pred = _panoptic(tmp_path, "pred", [one, two], gt_segments)
    missed = np.where(one == 10, 0, one).astype(np.uint32)
    compare = _panoptic(tmp_path, "compare", [missed, two], [gt_segments[0][1:], gt_segments[1]])
    return gt, pred, compare


def test_contents_equal_hand_counts(tiny, tmp_path):
    gt, pred, compare = tiny
    data = json.loads(open(run(ReportConfig(gt, str(tmp_path / "out"), thumbnails=0)).json).read())
    c = data["contents"]
    assert (c["images"], c["segments"], c["pixels"]) == (2, 5, 48)
    assert c["classes"] == {"listed": 2, "things": 1, "stuff": 1, "present": 2, "things_present": 1, "stuff_present": 1}
    person, sky = c["per_class"]
    assert (person["segments"], person["images"], person["pixels"]) == (3, 2, 12)
    assert (sky["segments"], sky["images"], sky["pixels"]) == (2, 2, 22)
    assert sky["share_of_pixels"] == 22 / 48
    assert c["crowd"] == {"segments": 1, "share_of_segments": 1 / 5, "pixels": 4, "share_of_labelled_pixels": 4 / 34}
    assert c["void"] == {"pixels": 14, "share_of_pixels": 14 / 48}
    assert c["instance_sizes"]["coco"] == {"small": 2, "medium": 0, "large": 0}  # the crowd is not an instance
    bins = {b["min_area"]: b["instances"] for b in c["instance_sizes"]["bins"] if b["instances"]}
    assert bins == {4: 1, 2: 1}  # 6 pixels in [4, 8), 2 pixels in [2, 4)
    assert c["segments_per_image"] == {"mean": 2.5, "max": 3, "histogram": [
        {"segments": 2, "images": 1, "or_more": False}, {"segments": 3, "images": 1, "or_more": False}]}
    assert c["image_sizes"] == [{"height": 4, "width": 6, "images": 2}]
    assert "comparison" not in data


def test_comparison_equals_hand_pq_and_intervals_do_not_depend_on_shards(tiny, tmp_path):
    gt, pred, compare = tiny
    reports = [json.loads(open(run(ReportConfig(gt, str(tmp_path / f"out{size}"), pred=pred, compare=compare,
                                                shard_size=size, thumbnails=0, resamples=200)).json).read())
               for size in (1, 2)]
    assert reports[0]["comparison"] == reports[1]["comparison"]
    person, sky = reports[0]["comparison"]["per_class"]
    assert person["pred"] == {"value": 1.0, "low": 1.0, "high": 1.0}
    assert person["compare"]["value"] == pytest.approx(2 / 3)  # 1 TP (IoU 1), 1 FN: 1 / (1 + 0.5)
    assert person["delta"]["value"] == pytest.approx(-1 / 3)
    assert person["delta"]["low"] <= -1 / 3 <= person["delta"]["high"] <= 0
    assert sky["delta"] == {"value": 0.0, "low": 0.0, "high": 0.0}
    assert reports[0]["comparison"]["overall"]["compare"]["value"] == pytest.approx((2 / 3 + 1) / 2)


def test_comparison_pq_equals_eval_pq(dataset, tmp_path):
    gt = str(dataset / "annotations" / "panoptic_val.json")
    pred = str(tmp_path / "pred.json")
    write_perturbed_panoptic(gt, pred, seed=3)
    data = run(ReportConfig(gt, str(tmp_path / "out"), pred=pred, shard_size=5, thumbnails=0, resamples=50)).data
    expected = evaluate_pq(gt, pred)
    for row in data["comparison"]["per_class"]:
        figures = expected["per_class"][str(row["id"])]
        assert row["pred"]["value"] == (figures["pq"] if figures["tp"] + figures["fp"] + figures["fn"] else None)
    assert data["comparison"]["overall"]["pred"]["value"] == pytest.approx(expected["All"]["pq"], abs=1e-15)


def test_comparison_ap_equals_eval_ap(dataset, tmp_path):
    gt = str(dataset / "annotations" / "instances_val.json")
    coco = json.loads(open(gt).read())
    pred = str(tmp_path / "results.json")
    write_json(pred, perturb_instances(coco, np.random.default_rng(0), crowded_images=0))
    data = run(ReportConfig(gt, str(tmp_path / "out"), pred=pred, shard_size=5, thumbnails=0, resamples=50)).data
    assert data["comparison"]["metric"] == "ap"
    expected = evaluate_ap(gt, pred)["per_class"]
    for row in data["comparison"]["per_class"]:
        ap = expected[str(row["id"])]["AP"]
        assert row["pred"]["value"] == (pytest.approx(ap, abs=1e-12) if ap >= 0 else None)
        if row["pred"]["value"] is not None:
            assert row["pred"]["low"] <= row["pred"]["high"]


def test_ap_intervals_do_not_depend_on_shards_or_on_how_many_records_are_read_at_once(dataset, tmp_path, monkeypatch):
    gt = str(dataset / "annotations" / "instances_val.json")
    coco = json.loads(open(gt).read())
    pred, other = str(tmp_path / "results.json"), str(tmp_path / "other.json")
    write_json(pred, perturb_instances(coco, np.random.default_rng(0), crowded_images=0))
    write_json(other, perturb_instances(coco, np.random.default_rng(1), crowded_images=0))

    def comparison(name, shard_size):
        return run(ReportConfig(gt, str(tmp_path / name), pred=pred, compare=other, shard_size=shard_size,
                                thumbnails=0, resamples=40)).data["comparison"]

    whole = comparison("whole", 100)
    monkeypatch.setattr(compare_module, "AP_ROWS", 1)  # one class at a time
    assert comparison("by-class", 7) == whole
    delta = whole["overall"]["delta"]
    assert delta["low"] < delta["high"] and delta["low"] <= delta["value"] <= delta["high"]


def test_the_compiled_poisson_weight_is_poisson_weights():
    ids = np.array([0, 1, 7, 123_456_789, 2**40 + 3])
    expected = poisson_weights(ids, 30, seed=5)
    assert [[compare_module._poisson_weight(i, b, 5) for i in ids] for b in range(30)] == expected.tolist()
    assert expected.max() > 1 and expected.min() == 0


def test_the_scratch_folder_works_on_s3_and_is_removed(tiny, s3_bucket, tmp_path):
    import fsspec

    gt, pred, compare = tiny
    local = run(ReportConfig(gt, str(tmp_path / "out"), pred=pred, compare=compare, shard_size=1, resamples=50)).data
    remote = run(ReportConfig(gt, f"s3://{s3_bucket}/report", pred=pred, compare=compare, shard_size=1,
                              resamples=50)).data
    assert remote == local
    written = {path.rsplit("/", 1)[-1] for path in fsspec.filesystem("s3").ls(f"{s3_bucket}/report")}
    assert written == {"report.html", "report.json", "label-errors.json"}  # the scratch folder went
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == ["label-errors.json", "report.html", "report.json"]


def test_the_scratch_folder_is_removed_when_the_report_fails(tiny, tmp_path):
    gt, pred, _ = tiny
    bad = tmp_path / "bad.json"
    bad.write_text(json.dumps({"annotations": [{"image_id": 99, "file_name": "x.png", "segments_info": []}]}))
    with pytest.raises(SegpipeError, match="image 99, which is not in the ground truth"):
        run(ReportConfig(gt, str(tmp_path / "out"), pred=pred, compare=str(bad)))
    assert list((tmp_path / "out").iterdir()) == []  # the first shard inputs were written, then removed


def test_worker_processes_and_ray_tasks_write_their_records_where_the_driver_reads_them(tiny, tmp_path, monkeypatch):
    ray = pytest.importorskip("ray")
    gt, pred, compare = tiny
    monkeypatch.chdir(tmp_path)  # OUT relative: Ray's workers run in another folder

    def report(out, **where):
        return run(ReportConfig(gt, out, pred=pred, compare=compare, shard_size=1, resamples=50, **where)).data

    here = report("here")
    assert report("workers", workers=2) == here
    ray.init(num_cpus=1, include_dashboard=False, log_to_driver=False)
    try:
        assert report("ray", address="auto") == here
    finally:
        ray.shutdown()
    assert here["errors"]["tide"]["counts"]["Miss"] == 0 and here["health"]["checked"]


def test_poisson_weights_are_fixed_per_image_and_look_like_poisson_1():
    weights = poisson_weights(np.arange(2000), 500, seed=0)
    assert np.array_equal(weights[:, 7:9], poisson_weights(np.array([7, 8]), 500, seed=0))
    assert abs(weights.mean() - 1) < 0.01 and abs(weights.var() - 1) < 0.02
    assert not np.array_equal(weights, poisson_weights(np.arange(2000), 500, seed=1))


def test_bad_input_is_one_error(tiny, tmp_path):
    gt, pred, compare = tiny
    with pytest.raises(SegpipeError, match="--compare needs --pred"):
        run(ReportConfig(gt, str(tmp_path / "o"), compare=compare))
    with pytest.raises(SegpipeError, match="no such file"):
        run(ReportConfig(str(tmp_path / "none.json"), str(tmp_path / "o")))


def test_cli_writes_the_report_and_shows_progress(tiny, tmp_path):
    from typer.testing import CliRunner

    from pipeline.cli import app

    gt, pred, compare = tiny
    result = CliRunner().invoke(app, ["report", "--dataset", gt, "--pred", pred, "--out", str(tmp_path / "r"),
                                      "--shard-size", "1", "--resamples", "20"])
    assert result.exit_code == 0, result.output
    assert "shard 2/2 done (2/2 images)" in result.output  # progress (stderr, mixed in by the runner)
    assert (tmp_path / "r" / "report.json").exists() and (tmp_path / "r" / "report.html").exists()
    bad = CliRunner().invoke(app, ["report", "--dataset", str(tmp_path / "none.json"), "--out", str(tmp_path / "r")])
    assert bad.exit_code == 2 and "segpipe: error:" in bad.output and "Traceback" not in bad.output


# --- the page in headless Chromium --------------------------------------------------------------------


def _chromium() -> str:
    path = shutil.which("chromium") or shutil.which("chromium-browser")
    assert path, "headless Chromium is needed (Debian: apt-get install chromium; `make test` installs it)"
    return path


def _browser(page, *args: str) -> subprocess.CompletedProcess:
    return subprocess.run([_chromium(), "--headless", "--disable-gpu", "--no-sandbox", "--hide-scrollbars",
                           "--virtual-time-budget=10000", *args, f"file://{page}"],
                          capture_output=True, text=True, timeout=120)


def _page_check(page) -> str:
    """The page's own verdict (its load script checks every image, every plot and script errors), from the DOM."""
    dom = _browser(page, "--dump-dom").stdout
    match = re.search(r'<html[^>]*data-check="(\w+)"', dom)
    return match[1] if match else "not run"


@pytest.fixture(scope="module")
def page(tmp_path_factory, dataset):
    tmp = tmp_path_factory.mktemp("page")
    gt = str(dataset / "annotations" / "panoptic_val.json")
    pred, compare = str(tmp / "p1.json"), str(tmp / "p2.json")
    write_perturbed_panoptic(gt, pred, seed=1)
    write_perturbed_panoptic(gt, compare, seed=2)
    return run(ReportConfig(gt, str(tmp / "report"), pred=pred, compare=compare, shard_size=5, resamples=200)).html


def test_page_is_self_contained_and_renders_in_chromium(page, tmp_path):
    text = open(page).read()
    assert not re.search(r'(src|href)="(?!data:)', text) and "fetch(" not in text and "XMLHttpRequest" not in text
    data = json.loads(open(page.replace("report.html", "report.json")).read())
    strips = min(6, len(data["errors"]["worst_images"])) + min(6, len(data["errors"]["candidates"]))
    # contents 3, model errors 4 (TIDE, confusion, calibration, precision-recall), comparison 1; thumbnails 8 and
    # the strips of the worst images and of the label-error candidates
    assert text.count('data-plot="') == 8 and text.count("data:image/jpeg;base64,") == 8 + strips and strips
    assert _page_check(page) == "ok"
    shot = tmp_path / "shot.png"
    _browser(page, f"--screenshot={shot}", "--window-size=1200,2400")
    from PIL import Image

    pixels = np.asarray(Image.open(shot).convert("L"))
    assert pixels.shape == (2400, 1200) and pixels.std() > 20  # text, plots and thumbnails, not a blank page


@pytest.mark.parametrize("planted", [
    "<script>window.noSuchFunction();</script>",  # a JavaScript error
    '<img alt="planted" src="data:image/png;base64,iVBORw0KGgo=">',  # an image that does not decode
    '<figure data-plot="planted"><figcaption>no image</figcaption></figure>',  # a plot that did not render
    '<figure data-plot="planted"><img alt="hidden" style="display:none" src="data:image/gif;base64,'
    'R0lGODlhAQABAIAAAAAAAP///yH5BAEAAAAALAAAAAABAAEAAAIBRAA7"></figure>',  # a plot with no size on the page
])
def test_page_check_fails_on_each_planted_fault(page, tmp_path, planted):
    broken = tmp_path / "broken.html"
    broken.write_text(open(page).read().replace("<h2>Contents</h2>", planted + "<h2>Contents</h2>", 1))
    assert _page_check(broken) == "failed"


def _count_segments(data, context):
    return sum(len(image.segments) for image in data.truth)


def test_a_section_plugs_in_with_one_line(tiny, tmp_path, monkeypatch):
    """The contract health and errors use: a (shard, merge) pair, optionally a driver-side start."""
    import pipeline.report as report

    gt, pred, compare = tiny
    extra = report.Section("counted", _count_segments, lambda parts, context, started: {"parts": parts, "start": started},
                           start=lambda truth: len(truth.images))
    monkeypatch.setattr(report, "SECTIONS", (*report.SECTIONS, extra))
    data = run(ReportConfig(gt, str(tmp_path / "out"), shard_size=1, thumbnails=0)).data
    assert data["counted"] == {"parts": [2, 3], "start": 2}
