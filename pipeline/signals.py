"""Quality signals of predicted segments, the ones a pseudo-label filter decides on: stability and flip agreement.

Stability is Segment Anything's: a mask is stable when cutting its soft output at a lower and at a
higher level gives nearly the same mask. SAM cuts mask logits at -1 and +1 around its threshold 0; here
every model's soft output is a probability, so the cut-offs are the probabilities whose logits lie 1
below and 1 above the logit of the model's own threshold (0.269 and 0.731 around 0.5). As the higher cut
lies inside the lower, the IoU of the two masks is |above high| / |above low|.

- Instance masks (Mask R-CNN): the cuts of each detection's mask probabilities, over the whole image,
  counted on the model's device (`mask_stability`), so no soft mask leaves the model actor.
- Class maps (softmax heads: segpipe_small, the stuff of the panoptic model): a segment's pixels cut at
  the probability of its own class; the model hands on only the two cuts as bits (`soft_cuts`), and
  post-processing counts them per segment (`region_stability`). Pixels of other segments never count,
  whatever their probability of this class. segpipe_small takes the softmax normaliser on its head's
  1/4-resolution grid, upsampled as its logits are (a slight underestimate of the probability where
  classes meet; exact would cost 40% more model time on a CPU).

A segment with no pixel above the lower cut has stability 0.

Flip agreement: the model labels the horizontally flipped image too; a segment's agreement is its best
IoU with a segment of the same category in that prediction, flipped back (0 when there is none).
"""

from __future__ import annotations

import math
from typing import TYPE_CHECKING

import numpy as np

if TYPE_CHECKING:
    import torch

    from pipeline.structures import ImagePrediction

OFFSET = 1.0
"""How far (in logits) the two cuts lie from the model's threshold: SAM's stability offset."""


def cuts(threshold: float = 0.5) -> tuple[float, float]:
    """The lower and higher probability cut-offs around a probability threshold."""
    logit = math.log(threshold / (1 - threshold))
    return 1 / (1 + math.exp(-(logit - OFFSET))), 1 / (1 + math.exp(-(logit + OFFSET)))


def mask_stability(probabilities: torch.Tensor, threshold: float) -> np.ndarray:
    """Stability of each of N soft masks (N x H x W probabilities), counted where they are (e.g. a GPU)."""
    low, high = cuts(threshold)
    above_low = (probabilities > low).flatten(1).sum(1).double()
    above_high = (probabilities > high).flatten(1).sum(1).double()
    return (above_high / above_low.clamp(min=1)).cpu().numpy()


def soft_cuts(class_probability: np.ndarray, threshold: float = 0.5) -> np.ndarray:
    """2 x H x W booleans: each pixel's probability of its predicted class above the lower and the higher cut."""
    low, high = cuts(threshold)
    return np.stack([class_probability > low, class_probability > high])


def region_stability(ids: np.ndarray, segment_ids: list[int], above: np.ndarray) -> list[float]:
    """Stability of each segment of an id map, from `soft_cuts` (2 x H x W) of the same pixels."""
    if not segment_ids:
        return []
    size = int(max(segment_ids)) + 1
    flat = ids.ravel().astype(np.int64)
    low = np.bincount(flat[above[0].ravel()], minlength=size)
    high = np.bincount(flat[above[1].ravel()], minlength=size)
    return [float(high[s] / low[s]) if low[s] else 0.0 for s in segment_ids]


def flip_agreement(prediction: ImagePrediction, flipped: ImagePrediction) -> list[float]:
    """Each segment's best IoU with a same-category segment of `flipped` (the prediction on the mirrored
    image), mirrored back; pycocotools' mask IoU on the RLEs."""
    from pycocotools import mask as mask_utils

    if not prediction.segments:
        return []
    if not flipped.segments:
        return [0.0] * len(prediction.segments)
    mirrored = [mask_utils.encode(np.asfortranarray(s.rle.to_mask()[:, ::-1].astype(np.uint8)))
                for s in flipped.segments]
    own = [s.rle.encoded() for s in prediction.segments]
    iou = mask_utils.iou(own, mirrored, [0] * len(mirrored))
    same = (np.array([s.category_id for s in prediction.segments])[:, None]
            == np.array([s.category_id for s in flipped.segments])[None, :])
    return np.where(same, iou, 0.0).max(axis=1).astype(float).tolist()


def touches_border(bbox: tuple[float, float, float, float], height: int, width: int) -> bool:
    """Whether a segment's box reaches an edge of the image (it may be cut off there)."""
    x, y, w, h = bbox
    return w > 0 and h > 0 and (x <= 0 or y <= 0 or x + w >= width or y + h >= height)
