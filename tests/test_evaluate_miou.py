"""mIoU: torchmetrics parity on random label PNGs, the panoptic semantic view against painting, workers, errors."""

import json

import numpy as np
import pytest
import torch
from PIL import Image
from torchmetrics.classification import MulticlassAccuracy, MulticlassJaccardIndex
from typer.testing import CliRunner

from pipeline.cli import app
from pipeline.evaluate.match import Labelling, Overlaps
from pipeline.evaluate.miou import ConfusionStats, confusion_from_overlaps, evaluate_miou, summarize
from pipeline.io.fs import read_bytes, read_json
from pipeline.structures import decode_panoptic_png
from pipeline.synth import write_perturbed_panoptic

K = 8
NEVER = 7  # in no ground truth and no prediction
PREDICTED_ONLY = 6  # predicted, never in the ground truth
IGNORE = 255


def _write_pngs(folder, maps):
    folder.mkdir(parents=True, exist_ok=True)
    for name, labels in maps.items():
        Image.fromarray(labels).save(folder / name)


def _label_maps(seed, void_predictions=False):
    """Random (gt, pred) label maps of several sizes: each image uses a subset of the classes, with
    ignored ground truth, a class only predicted and one never seen; optionally predictions left VOID."""
    rng = np.random.default_rng(seed)
    gt, pred = {}, {}
    for i in range(7):
        shape = tuple(rng.integers(5, 40, 2))
        present = rng.choice(PREDICTED_ONLY, rng.integers(1, PREDICTED_ONLY), replace=False)
        g = rng.choice(present, shape).astype(np.uint8)
        g[rng.random(shape) < 0.1] = IGNORE
        p = np.where(rng.random(shape) < 0.6, g, rng.choice(PREDICTED_ONLY + 1, shape)).astype(np.uint8)
        p[p == IGNORE] = 0
        if void_predictions:
            p[rng.random(shape) < 0.1] = IGNORE
        gt[f"im{i:02d}.png"], pred[f"im{i:02d}.png"] = g, p
    return gt, pred


@pytest.fixture
def folders(tmp_path):
    gt, pred = _label_maps(0)
    _write_pngs(tmp_path / "gt", gt)
    _write_pngs(tmp_path / "pred", pred)
    return tmp_path / "gt", tmp_path / "pred", gt, pred


def _torchmetrics(gt, pred, metric):
    for name in gt:
        metric.update(torch.from_numpy(pred[name].astype(np.int64)), torch.from_numpy(gt[name].astype(np.int64)))
    return metric.compute().double().numpy()


def test_numbers_equal_torchmetrics_jaccard_and_accuracy(folders):
    gt_dir, pred_dir, gt, pred = folders
    result = evaluate_miou(str(gt_dir), str(pred_dir), classes=K, shard_size=3)
    iou = [c["iou"] for c in result["per_class"]]
    acc = [c["acc"] for c in result["per_class"]]

    def metric(kind, average):
        return _torchmetrics(gt, pred, kind(num_classes=K, average=average, ignore_index=IGNORE))

    # Per class: torchmetrics reports 0 where a class is absent; segpipe null, and the same value elsewhere.
    assert iou[NEVER] is None and acc[NEVER] is None and acc[PREDICTED_ONLY] is None
    assert iou[PREDICTED_ONLY] == 0.0
    tm_iou, tm_acc = metric(MulticlassJaccardIndex, None), metric(MulticlassAccuracy, None)
    assert [v for v in iou if v is not None] == pytest.approx([tm_iou[c] for c in range(K) if iou[c] is not None], rel=1e-6)
    assert [v for v in acc if v is not None] == pytest.approx([tm_acc[c] for c in range(K) if acc[c] is not None], rel=1e-6)
    # Means: torchmetrics' macro Jaccard leaves out classes absent from both sides, as segpipe's mIoU does;
    # its weighted Jaccard (weights: ground-truth pixels) is fwIoU; micro accuracy is aAcc.
    assert result["mIoU"] == pytest.approx(metric(MulticlassJaccardIndex, "macro"), rel=1e-6)
    assert result["fwIoU"] == pytest.approx(metric(MulticlassJaccardIndex, "weighted"), rel=1e-6)
    assert result["aAcc"] == pytest.approx(metric(MulticlassAccuracy, "micro"), rel=1e-6)
    # mAcc averages the classes in the ground truth (mmsegmentation, detectron2); torchmetrics' macro
    # accuracy also averages in the predicted-only class, at 0.
    in_gt = [c for c in range(K) if acc[c] is not None]
    assert result["mAcc"] == pytest.approx(np.mean(tm_acc[in_gt]), rel=1e-6)
    assert metric(MulticlassAccuracy, "macro") == pytest.approx(result["mAcc"] * len(in_gt) / (len(in_gt) + 1), rel=1e-6)
    assert result["n"] == K - 1 and result["pixels"] == sum(int((g != IGNORE).sum()) for g in gt.values())


def test_void_predictions_count_against_the_ground_truth_class(tmp_path):
    gt, pred = _label_maps(1, void_predictions=True)
    _write_pngs(tmp_path / "gt", gt)
    _write_pngs(tmp_path / "pred", pred)
    result = evaluate_miou(str(tmp_path / "gt"), str(tmp_path / "pred"), classes=K)
    # VOID as an extra class K that no ground truth has: the same per-class IoU, accuracy and aAcc.
    as_class = {name: np.where(p == IGNORE, K, p).astype(np.uint8) for name, p in pred.items()}
    tm_iou = _torchmetrics(gt, as_class, MulticlassJaccardIndex(num_classes=K + 1, average=None, ignore_index=IGNORE))
    tm_acc = _torchmetrics(gt, as_class, MulticlassAccuracy(num_classes=K + 1, average="micro", ignore_index=IGNORE))
    assert [c["iou"] or 0.0 for c in result["per_class"]] == pytest.approx(tm_iou[:K].tolist(), rel=1e-6)
    assert result["aAcc"] == pytest.approx(float(tm_acc), rel=1e-6)
    assert sum(c["pred_pixels"] for c in result["per_class"]) < result["pixels"]


def test_workers_give_byte_identical_results(folders, tmp_path):
    gt_dir, pred_dir, _, _ = folders
    runs = [json.dumps(evaluate_miou(str(gt_dir), str(pred_dir), classes=K, workers=w, shard_size=2)) for w in (1, 2)]
    assert runs[0] == runs[1]
    cli = CliRunner().invoke(app, ["eval", "miou", "--gt", str(gt_dir), "--pred", str(pred_dir), "--classes", str(K),
                                   "--out", str(tmp_path / "r.json"), "--workers", "2"])
    assert cli.exit_code == 0, cli.output
    assert "mIoU" in cli.stdout and read_json(str(tmp_path / "r.json")) == json.loads(runs[0])


def test_class_list_json_names_the_classes_and_sixteen_bit_pngs_read(tmp_path):
    labels = np.arange(300, dtype=np.uint16).reshape(15, 20)
    _write_pngs(tmp_path / "gt", {"a.png": labels})
    _write_pngs(tmp_path / "pred", {"a.png": labels})
    (tmp_path / "classes.json").write_text(json.dumps({"categories": [{"id": k + 1, "name": f"c{k}"} for k in range(300)]}))
    result = evaluate_miou(str(tmp_path / "gt"), str(tmp_path / "pred"), classes=str(tmp_path / "classes.json"),
                           ignore_index=65535)
    assert (result["mIoU"], result["n"], result["per_class"][299]["name"]) == (1.0, 300, "c299")


def test_summarize_is_null_where_nothing_was_evaluated():
    result = summarize(ConfusionStats.zeros(2), ["a", "b"])
    assert (result["mIoU"], result["fwIoU"], result["aAcc"], result["mAcc"], result["n"]) == (None, None, None, None, 0)


# --- the semantic view of panoptic segments -----------------------------------------------------


def _painted(gt_maps, gt_segments, pred_maps, pred_segments, n_classes):
    """The confusion by painting class maps pixel by pixel: crowd, VOID and unlisted GT ignored."""
    matrix = np.zeros((n_classes, n_classes + 1), np.int64)
    for g, gs, p, ps in zip(gt_maps, gt_segments, pred_maps, pred_segments):
        g_class, p_class = np.full(g.shape, -1), np.full(p.shape, n_classes)
        for sid, category, crowd in gs:
            if not crowd:
                g_class[g == sid] = category
        for sid, category, _ in ps:
            p_class[p == sid] = category
        valid = g_class >= 0
        np.add.at(matrix, (g_class[valid], p_class[valid]), 1)
    return matrix


def _random_panoptic(rng, n_segments, n_classes, shape=(23, 31)):
    ids = np.zeros(shape, np.uint32)
    for sid in rng.choice(np.arange(1, 2**24), n_segments, replace=False):
        y, x = rng.integers(0, shape[0], 2), rng.integers(0, shape[1], 2)
        ids[min(y):max(y) + 1, min(x):max(x) + 1] = sid
    present = [int(s) for s in np.unique(ids) if s]
    # The last id of an image is left unlisted half the time (a ground truth's stray pixels).
    listed = present[:-1] if rng.random() < 0.5 else present
    return ids, [(sid, int(rng.integers(n_classes)), bool(rng.random() < 0.2)) for sid in listed]


def test_confusion_from_overlaps_equals_painted_class_maps():
    rng = np.random.default_rng(5)
    n_classes = 5
    gt = [_random_panoptic(rng, 8, n_classes) for _ in range(12)]
    pred = [_random_panoptic(rng, 6, n_classes) for _ in range(12)]
    overlaps = Overlaps.of(Labelling.from_id_maps([m for m, _ in gt], [[s for s, _, _ in ss] for _, ss in gt]),
                           Labelling.from_id_maps([m for m, _ in pred], [[s for s, _, _ in ss] for _, ss in pred]))
    flat = [s for _, ss in gt for s in ss]
    stats = confusion_from_overlaps(overlaps, np.array([c for _, c, _ in flat]), np.array([w for _, _, w in flat]),
                                    np.array([c for _, ss in pred for _, c, _ in ss]), n_classes)
    expected = _painted([m for m, _ in gt], [ss for _, ss in gt], [m for m, _ in pred], [ss for _, ss in pred], n_classes)
    assert stats.matrix.dtype == np.int64 and stats.matrix[:, n_classes].sum() > 0
    np.testing.assert_array_equal(stats.matrix, expected)


@pytest.fixture(scope="module")
def panoptic(dataset, tmp_path_factory):
    gt_json = str(dataset / "annotations" / "panoptic_val.json")
    pred_json = str(tmp_path_factory.mktemp("miou_pred") / "panoptic_pred.json")
    write_perturbed_panoptic(gt_json, pred_json, seed=4)
    return gt_json, pred_json


def test_panoptic_files_give_the_painted_semantic_numbers(panoptic):
    gt_json, pred_json = panoptic
    gt, pred = read_json(gt_json), read_json(pred_json)
    index = {c["id"]: i for i, c in enumerate(gt["categories"])}
    by_image = {a["image_id"]: a for a in pred["annotations"]}

    def read(json_uri, annotation):
        uri = f"{json_uri[:-5]}/{annotation['file_name']}"
        segments = [(s["id"], index[s["category_id"]], s.get("iscrowd", 0) == 1) for s in annotation["segments_info"]]
        return decode_panoptic_png(read_bytes(uri), uri), segments

    pairs = [(read(gt_json, a), read(pred_json, by_image[a["image_id"]])) for a in gt["annotations"]]
    assert any(crowd for (_, gs), _ in pairs for _, _, crowd in gs)
    painted = _painted(*zip(*[(g, gs, p, ps) for (g, gs), (p, ps) in pairs]), len(index))
    expected = summarize(ConfusionStats(painted), [c["name"] for c in gt["categories"]])
    for workers in (1, 2):
        assert evaluate_miou(gt_json, pred_json, workers=workers, shard_size=5) == expected


# --- bad inputs: one line, exit 2 ---------------------------------------------------------------


def test_bad_inputs_are_one_line_errors_with_exit_2(folders, tmp_path, panoptic):
    gt_dir, pred_dir, gt, _ = folders
    short = tmp_path / "short"
    _write_pngs(short, {name: labels for name, labels in list(gt.items())[1:]})
    big = tmp_path / "big"
    _write_pngs(big, {name: np.full_like(labels, 9) for name, labels in gt.items()})
    small = tmp_path / "small"
    _write_pngs(small, {name: labels[:-1] for name, labels in gt.items()})
    rgb = tmp_path / "rgb"
    _write_pngs(rgb, {name: np.stack([labels] * 3, axis=-1) for name, labels in gt.items()})
    gt_json, _ = panoptic
    common = ["--gt", str(gt_dir), "--classes", str(K)]
    for arguments, message in (
        (["--gt", str(gt_dir), "--pred", str(pred_dir)], "--classes: give the class list"),
        ([*common, "--pred", str(short)], "short: no prediction im00.png"),
        ([*common, "--pred", str(big)], "big/im00.png: prediction has class index 9, not below 8 classes"),
        ([*common, "--pred", str(small)], "small/im00.png: prediction is"),
        ([*common, "--pred", str(rgb)], "rgb/im00.png: is a RGB PNG"),
        ([*common, "--pred", str(tmp_path / "nowhere")], "nowhere: no such folder"),
        (["--gt", str(gt_dir), "--pred", str(pred_dir), "--classes", str(tmp_path / "c.json")], "c.json: no such file"),
        (["--gt", gt_json, "--pred", gt_json, "--classes", "3"], "brings its own categories"),
    ):
        result = CliRunner().invoke(app, ["eval", "miou", *arguments])
        assert result.exit_code == 2, (arguments, result.output)
        assert message in result.output.strip().splitlines()[-1], result.output
        assert "Traceback" not in result.output
