"""Training without Ray: datasets become samples, the sample stream, validation = `segpipe eval`, bad input."""

import json

import numpy as np
import pytest
from typer.testing import CliRunner

from pipeline.cli import app
from pipeline.errors import SegpipeError
from pipeline.fusion import FusionConfig
from pipeline.models import ModelSettings, load_model
from pipeline.synth import categories
from pipeline.train.data import check_images, decode, load_dataset, read_encoded
from pipeline.train.worker import Plan, sample_index, validate


def _plan(dataset, steps=10, batch_size=4, seed=0):
    return Plan(model="segpipe_small", settings=ModelSettings(), train=dataset, val=dataset, steps=steps,
                batch_size=batch_size, learning_rate=1e-3, warmup=1, seed=seed, checkpoint_every=5, log_every=5,
                threads=1)


def test_panoptic_and_instances_files_decode_to_the_same_thing_maps(dataset):
    panoptic = load_dataset(str(dataset / "annotations" / "panoptic_val.json"))
    instances = load_dataset(str(dataset / "annotations" / "instances_val.json"))
    assert (panoptic.kind, instances.kind) == ("panoptic", "instances")
    assert panoptic.images == instances.images == str(dataset / "val")  # COCO's layout
    assert len(panoptic.examples) == 12 and panoptic.fingerprint != instances.fingerprint
    by_id = {e.image_id: e for e in instances.examples}
    thing_ids = {c["id"] for c in categories() if c["isthing"]}
    for example, encoded in zip(panoptic.examples, read_encoded(panoptic, list(panoptic.examples))):
        sample = decode(panoptic, example, *encoded)
        other = decode(instances, by_id[example.image_id], *read_encoded(instances, [by_id[example.image_id]])[0])
        assert np.array_equal(sample.image, other.image)
        # Every thing (crowds too) covers the same pixels in both files, whatever its id.
        things = sorted((s["category_id"], int((sample.ids == s["id"]).sum())) for s in sample.segments
                        if s["category_id"] in thing_ids)
        again = sorted((s["category_id"], int((other.ids == s["id"]).sum())) for s in other.segments)
        assert things == again and things


def test_the_sample_stream_is_a_permutation_per_epoch_and_fixed_by_the_seed(dataset):
    data = load_dataset(str(dataset / "annotations" / "panoptic_val.json"))
    plan = _plan(data)
    stream = [sample_index(plan, p) for p in range(36)]
    for epoch in range(3):
        assert sorted(i for i, _ in stream[12 * epoch:12 * (epoch + 1)]) == list(range(12))
    assert stream[:12] != stream[12:24]  # a new order each epoch
    assert 0 < sum(flip for _, flip in stream) < 36
    assert stream == [sample_index(plan, p) for p in range(36)]
    assert stream != [sample_index(_plan(data, seed=1), p) for p in range(36)]


def test_a_pseudo_ratio_fixes_the_mix_of_every_batch_and_each_source_keeps_its_own_stream(dataset):
    from dataclasses import replace

    data = load_dataset(str(dataset / "annotations" / "panoptic_val.json"))  # 12 examples
    human = replace(data, examples=data.examples[:4])
    pseudo = replace(data, uri="pseudo", examples=data.examples[4:])  # 8 examples: indices 4..11
    plan = replace(_plan(human, batch_size=4), pseudo=(pseudo,), pseudo_ratio=0.25)
    stream = [sample_index(plan, p) for p in range(4 * 16)]
    batches = [stream[4 * b:4 * b + 4] for b in range(16)]
    assert all([i >= 4 for i, _ in batch] == [True, False, False, False] for batch in batches)  # 1 of 4 pseudo
    pseudo_stream = [i for batch in batches for i, _ in batch[:1]]
    assert sorted(pseudo_stream[:8]) == sorted(pseudo_stream[8:]) == list(range(4, 12))  # a permutation an epoch
    human_stream = [i for batch in batches for i, _ in batch[1:]]
    assert all(sorted(human_stream[4 * e:4 * e + 4]) == [0, 1, 2, 3] for e in range(12))
    assert stream == [sample_index(plan, p) for p in range(64)]
    # Without a ratio: one stream over all 12 examples, the same as 12 human ones.
    mixed = replace(plan, pseudo_ratio=None)
    assert [sample_index(mixed, p) for p in range(24)] == [sample_index(_plan(data), p) for p in range(24)]
    assert all(sum(i >= 4 for i, _ in b) == 4 for b in [[sample_index(replace(plan, pseudo_ratio=1.0), p)
                                                         for p in range(4 * k, 4 * k + 4)] for k in range(5)])


def test_validation_gives_the_numbers_segpipe_eval_pq_and_pycocotools_give_for_the_same_predictions(dataset, tmp_path):
    """The training loop's PQ is `segpipe eval pq` of the model's predictions, to the last bit, and its AP
    is pycocotools' on the instances file. The model's outputs are the ground truth's own targets (a random
    model scores 0 on both sides, which would agree whatever validation computed)."""
    from pycocotools.coco import COCO
    from pycocotools.cocoeval import COCOeval

    from pipeline.evaluate.pq import evaluate_pq
    from pipeline.io.fs import write_bytes, write_json
    from pipeline.models.outputs import bottom_up_targets
    from pipeline.structures import ImagePrediction, encode_panoptic_png

    data = load_dataset(str(dataset / "annotations" / "panoptic_val.json"))
    settings = ModelSettings(random_weights=True, seed=3, categories=tuple(data.categories), score_threshold=0.5,
                             fusion=FusionConfig(stuff_area_threshold=64))
    adapter = load_model("segpipe_small", settings)
    examples = list(data.examples)
    encoded = read_encoded(data, examples)
    ids_of = tuple(c["id"] for c in data.categories)
    things = tuple(bool(c["isthing"]) for c in data.categories)
    oracle = {}
    for example, (image, png) in zip(examples, encoded):
        sample = decode(data, example, image, png)
        targets = bottom_up_targets(sample.ids, sample.segments, ids_of, things)
        targets["semantic"][targets["semantic"] == 255] = things.index(False)  # VOID as a stuff class
        oracle[sample.image.tobytes()] = targets
    adapter.forward = lambda images: [oracle[image.tobytes()] for image in images]
    metrics = validate(adapter, data, examples, encoded, rank=0, world=1)
    annotations, results = [], []
    thing_ids = {c for c, t in zip(ids_of, things) if t}
    for example, (image, png) in zip(examples, encoded):
        sample = decode(data, example, image, png)
        ids, segments = adapter.postprocess.panoptic(adapter.forward([sample.image])[0])
        prediction = ImagePrediction.from_panoptic(example.image_id, example.file_name, ids, segments)
        write_bytes(str(tmp_path / "pred" / example.png), encode_panoptic_png(ids))
        annotations.append({"image_id": example.image_id, "file_name": example.png,
                            "segments_info": [s.segment_info() for s in prediction.segments]})
        results += [r for r in prediction.to_coco_results() if r["category_id"] in thing_ids]
    write_json(str(tmp_path / "pred.json"), {"annotations": annotations, "categories": list(data.categories)})
    expected = evaluate_pq(str(dataset / "annotations" / "panoptic_val.json"), str(tmp_path / "pred.json"))
    assert expected["All"]["n"] == 12 and expected["Things"]["pq"] > 0.5 and expected["Stuff"]["pq"] > 0.5
    assert metrics["pq"] == expected["All"]["pq"] and metrics["pq_things"] == expected["Things"]["pq"]
    assert metrics["pq_stuff"] == expected["Stuff"]["pq"]
    assert (metrics["sq"], metrics["rq"]) == (expected["All"]["sq"], expected["All"]["rq"])
    gt = COCO(str(dataset / "annotations" / "instances_val.json"))
    evaluator = COCOeval(gt, gt.loadRes(results), "segm")
    evaluator.evaluate()
    evaluator.accumulate()
    evaluator.summarize()
    assert evaluator.stats[0] > 0.5
    assert metrics["ap"] == pytest.approx(evaluator.stats[0], abs=1e-12)
    assert metrics["ap50"] == pytest.approx(evaluator.stats[1], abs=1e-12)


@pytest.fixture
def cli(tmp_path):
    runner = CliRunner()

    def invoke(*arguments):
        result = runner.invoke(app, ["train", *arguments])
        assert "Traceback" not in result.output
        return result
    return invoke


def test_bad_training_input_is_one_clear_line(cli, dataset, tmp_path):
    panoptic = str(dataset / "annotations" / "panoptic_val.json")
    gt = json.loads((dataset / "annotations" / "panoptic_val.json").read_text())
    empty = tmp_path / "annotations" / "panoptic_empty.json"
    empty.parent.mkdir()
    empty.write_text(json.dumps({**gt, "annotations": []}))
    garbage = tmp_path / "garbage.pt"
    garbage.write_bytes(b"not a checkpoint at all")
    # A checkpoint made for other categories: the data's category 1 is not among them.
    import torch

    others = [c for c in categories() if c["id"] != 1]
    net = load_model("segpipe_small", ModelSettings(random_weights=True, categories=tuple(others))).module
    torch.save({"model": net.state_dict(), "categories": others}, tmp_path / "other.pt")
    common = ["--val", panoptic, "--steps", "1", "--out", str(tmp_path / "out")]
    for arguments, message in (
        (["--train", str(empty), "--model", "segpipe_small"], "panoptic_empty.json: holds no annotated images"),
        (["--train", panoptic, "--model", "segpipe_small", "--init", str(garbage)],
         "garbage.pt: not a readable PyTorch checkpoint"),
        (["--train", panoptic, "--model", "segpipe_small", "--init", str(tmp_path / "other.pt")],
         "category 1 ('person') is not in segpipe_small"),
        (["--train", str(dataset / "annotations" / "instances_val.json"), "--model", "segpipe_small"],
         "segpipe_small learns panoptic labels"),
        (["--train", panoptic, "--model", "segpipe_small", "--resume"], "no training run to resume"),
        (["--train", panoptic, "--model", "segpipe_small", "--workers", "3"], "does not split over --workers 3"),
        (["--train", str(tmp_path), "--model", "segpipe_small"], "not a `segpipe infer` output"),
        (["--train", str(tmp_path / "nowhere.json"), "--model", "segpipe_small"], "nowhere.json: no such file"),
        (["--train", panoptic, "--model", "segpipe_small", "--pseudo-ratio", "0.5"], "--pseudo-ratio: needs --pseudo"),
        (["--train", panoptic, "--model", "segpipe_small", "--pseudo", str(tmp_path)], "not a `segpipe infer` output"),
        (["--train", panoptic, "--model", "segpipe_small", "--pseudo", str(dataset / "annotations" / "instances_val.json")],
         "segpipe_small learns panoptic labels"),
    ):
        result = cli(*arguments, *common)
        assert result.exit_code == 2 and message in result.output.strip().splitlines()[-1], (arguments, result.output)
    assert not (tmp_path / "out").exists()  # nothing was started


def test_a_run_without_resume_never_overwrites_one_that_exists(cli, dataset, tmp_path):
    out = tmp_path / "out"
    out.mkdir()
    (out / "train.json").write_text("{}")
    panoptic = str(dataset / "annotations" / "panoptic_val.json")
    result = cli("--train", panoptic, "--val", panoptic, "--model", "segpipe_small", "--steps", "1", "--out", str(out))
    assert result.exit_code == 2 and "holds a training run; pass --resume" in result.output
    result = cli("--train", panoptic, "--val", panoptic, "--model", "segpipe_small", "--steps", "1", "--out", str(out),
                 "--resume")
    assert result.exit_code == 2 and "holds a run with other" in result.output
    assert (out / "train.json").read_text() == "{}"


def test_images_missing_from_the_shards_are_named(dataset, tmp_path):
    data = load_dataset(str(dataset / "annotations" / "panoptic_val.json"), images=str(dataset / "shards"))
    assert len(read_encoded(data, list(data.examples[:3]))) == 3  # tar shards hold them too
    check_images(data)
    from pipeline.io.shards import write_tar_shard

    write_tar_shard(str(tmp_path / "partial" / "p-0.tar"), [(e.file_name, (dataset / "val" / e.file_name).read_bytes())
                                                            for e in data.examples[1:]])
    with pytest.raises(SegpipeError, match=rf"image '{data.examples[0].file_name}' is not under .*partial$"):
        check_images(load_dataset(str(dataset / "annotations" / "panoptic_val.json"), images=str(tmp_path / "partial")))
    elsewhere = tmp_path / "images"
    elsewhere.mkdir()
    (elsewhere / "other.jpg").write_bytes((dataset / "val" / data.examples[0].file_name).read_bytes())
    data = load_dataset(str(dataset / "annotations" / "panoptic_val.json"), images=str(elsewhere))
    with pytest.raises(SegpipeError, match=rf"image '{data.examples[0].file_name}' is not under .*images"):
        read_encoded(data, list(data.examples[:2]))
    with pytest.raises(SegpipeError, match=rf"image '{data.examples[0].file_name}' is not under .*images \(nor 11 more\)"):
        check_images(data)


def test_more_human_labels_join_the_human_stream(dataset):
    """Reviewed labels (`more_train`) are human labels: with a pseudo ratio they share the human places of
    every batch with `train`, indices counting train, then more_train, then the pseudo-labels."""
    from dataclasses import replace

    from pipeline.train.worker import sources

    data = load_dataset(str(dataset / "annotations" / "panoptic_val.json"))  # 12 examples
    human, reviewed = replace(data, examples=data.examples[:3]), replace(data, uri="reviewed", examples=data.examples[3:4])
    pseudo = replace(data, uri="pseudo", examples=data.examples[4:])
    plan = replace(_plan(human, batch_size=4), more_train=(reviewed,), pseudo=(pseudo,), pseudo_ratio=0.5)
    assert [d.uri for d in sources(plan)] == [human.uri, "reviewed", "pseudo"]
    batches = [[sample_index(plan, p)[0] for p in range(4 * b, 4 * b + 4)] for b in range(8)]
    assert all(all(i >= 4 for i in batch[:2]) and all(i < 4 for i in batch[2:]) for batch in batches)
    human_stream = [i for batch in batches for i in batch[2:]]
    assert all(sorted(human_stream[4 * e:4 * e + 4]) == [0, 1, 2, 3] for e in range(4))  # index 3: the reviewed one
    # Without more_train the same 4 examples as one human set give the same stream.
    same = replace(plan, train=replace(data, examples=data.examples[:4]), more_train=())
    assert [sample_index(same, p) for p in range(32)] == [sample_index(plan, p) for p in range(32)]


def test_a_segment_painted_over_entirely_is_no_training_target(dataset):
    """Rows paint in order (classified proposals come largest first): a whole covered by its parts has no pixel
    left, and is dropped rather than handed to the loss as an empty instance (whose centre would be NaN)."""
    import io

    from PIL import Image

    from pipeline.structures import Rle
    from pipeline.train.data import Dataset, Example

    whole, left, right = (np.zeros((8, 8), bool) for _ in range(3))
    whole[2:6, 2:6], left[2:6, 2:4], right[2:6, 4:6] = True, True, True
    rows = tuple({"id": k, "category_id": 1, "iscrowd": 0, "rle": Rle.from_mask(np.asfortranarray(m)).counts}
                 for k, m in ((70, whole), (71, left), (72, right)))
    data = Dataset("pseudo", "predictions", ({"id": 1, "name": "a", "isthing": 1},),
                   (Example(1, "a.png", 8, 8, rows),), "images", None, "x")
    encoded = io.BytesIO()
    Image.fromarray(np.zeros((8, 8, 3), np.uint8)).save(encoded, format="PNG")
    sample = decode(data, data.examples[0], encoded.getvalue(), None)
    assert [s["id"] for s in sample.segments] == [2, 3]  # rows 2 and 3; row 1 (the whole) is covered
    assert np.array_equal(sample.ids == 2, left) and np.array_equal(sample.ids == 3, right)
