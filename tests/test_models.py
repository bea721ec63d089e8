"""Model adapters: torchvision Mask R-CNN built offline, weights from paths and URIs, clear errors."""

import io

import fsspec
import numpy as np
import pytest
import torch

from pipeline.errors import SegpipeError
from pipeline.fusion import FusionConfig
from pipeline.models import ModelSettings, load_model
from pipeline.models.maskrcnn import COCO_THING_IDS

SMALL = {"min_size": 96, "max_size": 128, "score_threshold": 0.0}  # keeps CPU inference quick


@pytest.fixture(scope="module")
def images():
    rng = np.random.default_rng(0)
    return [rng.integers(0, 256, (80, 112, 3), dtype=np.uint8), rng.integers(0, 256, (64, 64, 3), dtype=np.uint8)]


def test_random_maskrcnn_predicts_valid_segments_with_coco_ids(images):
    torch.manual_seed(0)
    model = load_model("maskrcnn_resnet50_fpn", ModelSettings(random_weights=True, **SMALL))
    predictions = model.predict(images, [1, 2], ["a.jpg", "b.jpg"])
    assert [(p.image_id, p.height, p.width) for p in predictions] == [(1, 80, 112), (2, 64, 64)]
    segments = [s for p in predictions for s in p.segments]
    assert segments, "a random Mask R-CNN with score threshold 0 still detects something"
    assert all(s.category_id in COCO_THING_IDS and 0.0 <= s.score <= 1.0 for s in segments)
    assert all(s.rle.height == p.height and s.area == s.rle.area() for p in predictions for s in p.segments)


def test_weights_load_from_a_path_and_an_fsspec_uri_and_give_the_same_outputs(images, tmp_path):
    torch.manual_seed(1)
    source = load_model("maskrcnn_resnet50_fpn_v2", ModelSettings(random_weights=True, **SMALL))
    buffer = io.BytesIO()
    torch.save(source.module.state_dict(), buffer)
    (tmp_path / "w.pt").write_bytes(buffer.getvalue())
    fsspec.filesystem("memory").pipe("/models/w.pt", buffer.getvalue())
    expected = source.predict(images[:1], [1], ["a.jpg"])
    assert expected[0].segments  # threshold 0: detections whose masks and scores the loaded copies must repeat
    for uri in (str(tmp_path / "w.pt"), "memory://models/w.pt"):
        loaded = load_model("maskrcnn_resnet50_fpn_v2", ModelSettings(weights=uri, **SMALL))
        assert loaded.predict(images[:1], [1], ["a.jpg"]) == expected


def test_weight_errors_name_the_file_and_the_architecture(tmp_path):
    with pytest.raises(SegpipeError, match="maskrcnn_resnet50_fpn: no weights given"):
        load_model("maskrcnn_resnet50_fpn", ModelSettings(**SMALL))
    with pytest.raises(SegpipeError, match="missing.pt: no such file"):
        load_model("maskrcnn_resnet50_fpn", ModelSettings(weights=str(tmp_path / "missing.pt"), **SMALL))
    (tmp_path / "junk.pt").write_bytes(b"not a checkpoint")
    with pytest.raises(SegpipeError, match="junk.pt: not a readable PyTorch checkpoint"):
        load_model("maskrcnn_resnet50_fpn", ModelSettings(weights=str(tmp_path / "junk.pt"), **SMALL))
    torch.save({"backbone.body.conv1.weight": torch.zeros(1)}, tmp_path / "other.pt")
    with pytest.raises(SegpipeError, match="other.pt: does not fit maskrcnn_resnet50_fpn_v2"):
        load_model("maskrcnn_resnet50_fpn_v2", ModelSettings(weights=str(tmp_path / "other.pt"), **SMALL))
    with pytest.raises(SegpipeError, match="unknown model 'yolo'"):
        load_model("yolo")


def test_panoptic_model_gives_non_overlapping_things_and_stuff(images, tmp_path):
    from pipeline.fusion import FusionConfig
    from pipeline.models.panoptic import STUFF_IDS

    torch.manual_seed(2)
    settings = ModelSettings(random_weights=True, fusion=FusionConfig(score_threshold=0.0, stuff_area_threshold=16), **SMALL)
    model = load_model("panoptic_maskrcnn_deeplabv3", settings)
    predictions = model.predict(images, [1, 2], ["a.jpg", "b.jpg"])
    for prediction in predictions:
        ids, info = prediction.to_panoptic()  # raises if segments overlap
        assert ids.shape == (prediction.height, prediction.width)
        assert {s["category_id"] for s in info} <= set(COCO_THING_IDS) | set(STUFF_IDS)
    assert any(s.category_id in STUFF_IDS for p in predictions for s in p.segments)
    torch.save(model.module.state_dict(), tmp_path / "p.pt")
    again = load_model("panoptic_maskrcnn_deeplabv3", ModelSettings(weights=str(tmp_path / "p.pt"),
                                                                     fusion=settings.fusion, **SMALL))
    assert again.predict(images, [1, 2], ["a.jpg", "b.jpg"]) == predictions
    torch.save(model.module["instance"].state_dict(), tmp_path / "instance_only.pt")
    with pytest.raises(SegpipeError, match="instance_only.pt: does not fit panoptic_maskrcnn_deeplabv3"):
        load_model("panoptic_maskrcnn_deeplabv3", ModelSettings(weights=str(tmp_path / "instance_only.pt"), **SMALL))


def test_small_model_gives_panoptic_segments_of_the_datasets_categories(images, tmp_path):
    from pipeline.fusion import FusionConfig
    from pipeline.synth import categories

    settings = ModelSettings(random_weights=True, seed=3, score_threshold=0.0, categories=tuple(categories()),
                             fusion=FusionConfig(stuff_area_threshold=16))
    model = load_model("segpipe_small", settings)
    predictions = model.predict(images, [1, 2], ["a.jpg", "b.jpg"])
    known = {c["id"] for c in categories()}
    for prediction, image in zip(predictions, images):
        ids, info = prediction.to_panoptic()  # raises if segments overlap
        assert ids.shape == image.shape[:2] and info
        assert {s["category_id"] for s in info} <= known
    # Same seed, same random weights: every actor of a run builds the same model.
    assert load_model("segpipe_small", settings).predict(images, [1, 2], ["a.jpg", "b.jpg"]) == predictions
    torch.save({"model": model.module.state_dict(), "categories": list(categories())}, tmp_path / "s.pt")
    loaded = load_model("segpipe_small", ModelSettings(weights=str(tmp_path / "s.pt"), score_threshold=0.0,
                                                       fusion=settings.fusion))
    assert loaded.categories == model.categories
    assert loaded.predict(images, [1, 2], ["a.jpg", "b.jpg"]) == predictions
    coco = ModelSettings(weights=str(tmp_path / "s.pt"), categories=tuple(load_model(
        "maskrcnn_resnet50_fpn", ModelSettings(random_weights=True, **SMALL)).categories))
    with pytest.raises(SegpipeError, match="s.pt: trained for categories"):
        load_model("segpipe_small", coco)


def test_bottom_up_targets_decode_back_to_the_ground_truth(dataset):
    """The small model's output format can express the data: ground truth encoded as targets and decoded
    by the same post-processing that runs at inference scores a high PQ against itself."""
    import json

    from pipeline.evaluate.pq import evaluate_pq
    from pipeline.io.fs import write_json
    from pipeline.models.outputs import BottomUpPostprocess, bottom_up_targets
    from pipeline.structures import decode_panoptic_png, encode_panoptic_png

    gt_json = dataset / "annotations" / "panoptic_val.json"
    gt = json.loads(gt_json.read_text())
    ids_of = tuple(c["id"] for c in gt["categories"])
    things = tuple(bool(c["isthing"]) for c in gt["categories"])
    post = BottomUpPostprocess(ids_of, things, centre_threshold=0.5, stuff_area=1)
    out = dataset.parent / "roundtrip"
    annotations = []
    for annotation in gt["annotations"]:
        ids = decode_panoptic_png((dataset / "annotations" / "panoptic_val" / annotation["file_name"]).read_bytes(), "gt")
        targets = bottom_up_targets(ids, annotation["segments_info"], ids_of, things)
        assert targets["semantic"].shape == ids.shape and targets["centre"].max() <= 1.0
        void = targets["semantic"] == 255
        targets["semantic"][void] = ids_of.index(next(c for c, t in zip(ids_of, things) if not t))  # any stuff class
        pred, segments = post.panoptic(targets)
        pred[void] = 0
        (out / "p").mkdir(parents=True, exist_ok=True)
        (out / "p" / annotation["file_name"]).write_bytes(encode_panoptic_png(pred))
        present = set(np.unique(pred).tolist())
        annotations.append({**annotation, "segments_info": [s for s in segments if s["id"] in present]})
    write_json(str(out / "p.json"), {**gt, "annotations": annotations})
    result = evaluate_pq(str(gt_json), str(out / "p.json"))
    # Measured: stuff 1.0; things 0.83 (crowds on every image of this split, occluded instances whose
    # centres of mass fall outside their visible part): the ceiling of this output format on this data.
    assert result["Stuff"]["pq"] > 0.99 and result["Things"]["pq"] > 0.8, result


def test_a_training_checkpoint_brings_the_settings_it_was_validated_with(tmp_path):
    from pipeline.models.base import with_checkpoint_settings

    recorded = {"score_threshold": 0.2, "min_size": 256, "max_size": 512, "weights": "elsewhere.pt", "seed": 7,
                "fusion": {"score_threshold": 0.5, "mask_threshold": 0.5, "overlap_threshold": 0.3,
                           "stuff_area_threshold": 64}}
    torch.save({"model": {}, "settings": recorded}, tmp_path / "trained.pt")
    torch.save({"conv.weight": torch.zeros(1)}, tmp_path / "bare.pt")  # a bare state dict records nothing
    trained = ModelSettings(weights=str(tmp_path / "trained.pt"))
    settings = with_checkpoint_settings(trained, "segpipe_small", {})
    assert (settings.score_threshold, settings.min_size, settings.max_size) == (0.2, 256, 512)
    assert settings.fusion == FusionConfig(overlap_threshold=0.3, stuff_area_threshold=64)
    assert (settings.weights, settings.seed, settings.mask_threshold) == (str(tmp_path / "trained.pt"), 0, 0.5)  # not these
    given = with_checkpoint_settings(trained, "segpipe_small", {"stuff_area": 100, "score_threshold": 0.1})
    assert (given.fusion.stuff_area_threshold, given.fusion.overlap_threshold, given.score_threshold) == (100, 0.3, 0.1)
    bare = with_checkpoint_settings(ModelSettings(weights=str(tmp_path / "bare.pt")), "segpipe_small", {"min_size": 300})
    assert bare == ModelSettings(weights=str(tmp_path / "bare.pt"), min_size=300)
    assert with_checkpoint_settings(ModelSettings(random_weights=True), "segpipe_small", {}) == ModelSettings(random_weights=True)


def test_a_fingerprint_names_the_weights_not_the_file(tmp_path):
    """torch.save writes a fresh serialization id each time: equal models, unequal files, one fingerprint."""
    from pipeline.models.base import fingerprint
    from pipeline.synth import categories

    model = load_model("segpipe_small", ModelSettings(random_weights=True, categories=tuple(categories())))
    checkpoint = {"model": model.module.state_dict(), "categories": list(model.categories), "step": 3}
    torch.save(checkpoint, tmp_path / "a.pt")
    torch.save({**checkpoint, "step": 3}, tmp_path / "b.pt")
    assert (tmp_path / "a.pt").read_bytes() != (tmp_path / "b.pt").read_bytes()
    first = fingerprint(str(tmp_path / "a.pt"), "segpipe_small")
    assert len(first) == 16 and fingerprint(str(tmp_path / "b.pt"), "segpipe_small") == first
    name, tensor = next((k, v) for k, v in checkpoint["model"].items() if v.is_floating_point())
    nudged = tensor.clone()
    nudged.view(-1)[0] = torch.nextafter(nudged.view(-1)[0], torch.tensor(float("inf")))  # one ulp, one weight
    torch.save({**checkpoint, "model": {**checkpoint["model"], name: nudged}}, tmp_path / "c.pt")
    torch.save({**checkpoint, "categories": checkpoint["categories"][:-1]}, tmp_path / "d.pt")
    assert len({first, *(fingerprint(str(tmp_path / f), "segpipe_small") for f in ("c.pt", "d.pt"))}) == 3
