"""SAM proposals through `segpipe infer` on a real local Ray: a randomly initialised ViT-B (nothing downloaded),
a tiny image, a 3 x 3 point grid; and a SAM checkpoint that does not fit."""

import json

import numpy as np
import pyarrow.parquet as pq
import pytest
import torch
from PIL import Image
from typer.testing import CliRunner

from pipeline.cli import app
from pipeline.models import ModelSettings, load_model
from pipeline.models.base import ProposalSettings

pytest.importorskip("segment_anything")

# Every mask kept (a random model's predicted IoUs and stability are noise, its masks near-duplicates), so the
# table holds all 3 masks of each of the 9 prompts.
KNOBS = ProposalSettings(points_per_side=3, pred_iou_thresh=0.0, stability_score_thresh=0.0, box_nms_thresh=1.0)


def test_sam_proposals_land_in_the_predictions_table_with_their_scores(tmp_path):
    import ray

    image = np.random.default_rng(0).integers(0, 256, (40, 56, 3), dtype=np.uint8)
    (tmp_path / "pool").mkdir()
    Image.fromarray(image).save(tmp_path / "pool" / "000000000007.png")
    settings = ModelSettings(random_weights=True, seed=0, proposals=KNOBS)
    from pipeline.infer import InferConfig, run

    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False)
    try:
        summary = run(InferConfig(input=str(tmp_path / "pool"), out=str(tmp_path / "out"), model="sam_vit_b",
                                  settings=settings, batch_size=1))
    finally:
        ray.shutdown()
    assert summary.images == 1 and summary.failed == 0
    rows = pq.read_table(tmp_path / "out" / "predictions").to_pylist()
    assert [c["name"] for c in json.loads((tmp_path / "out" / "categories.json").read_text())] == ["object"]
    # What SAM's own generator says for the image, here with the same weights and one thread (as the actor).
    torch.set_num_threads(1)
    model = load_model("sam_vit_b", settings)
    records = model.generator.generate(image)
    assert len(rows) == len(records) == summary.segments == 27
    for row, record in zip(rows, records):
        assert (row["image_id"], row["category_id"], row["model"]) == (7, 1, "sam_vit_b")
        assert row["rle"] == record["segmentation"]["counts"] and row["area"] == record["area"]
        assert row["score"] == pytest.approx(record["predicted_iou"], abs=1e-6)
        assert row["stability"] == pytest.approx(record["stability_score"], abs=1e-6)
        assert row["point_coords"] == record["point_coords"] and row["crop_box"] == [0.0, 0.0, 56.0, 40.0]
    points = sorted({tuple(r["point_coords"][0]) for r in rows})
    grid = [(x, y) for x in (56 / 6, 28.0, 56 * 5 / 6) for y in (40 / 6, 20.0, 40 * 5 / 6)]  # the 3 x 3 prompts
    np.testing.assert_allclose(np.array(points), np.array(grid), rtol=1e-9)


def test_a_sam_checkpoint_that_does_not_fit_is_one_line(tmp_path):
    state = load_model("sam_vit_b", ModelSettings(random_weights=True)).module.state_dict()
    state["image_encoder.pos_embed"] = state["image_encoder.pos_embed"][..., :512]  # a ViT-B with the wrong width
    torch.save(state, tmp_path / "sam.pth")
    (tmp_path / "pool").mkdir()
    Image.fromarray(np.zeros((8, 8, 3), np.uint8)).save(tmp_path / "pool" / "a.png")
    result = CliRunner().invoke(app, ["infer", "--input", str(tmp_path / "pool"), "--model", "sam_vit_b",
                                      "--weights", str(tmp_path / "sam.pth"), "--out", str(tmp_path / "out")])
    assert result.exit_code == 2 and result.stderr.count("\n") == 1, result.output
    assert "sam.pth: does not fit sam_vit_b (size mismatch for image_encoder.pos_embed" in result.stderr
    assert not (tmp_path / "out").exists()
