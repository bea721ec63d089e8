"""The loop every Ray Train worker runs: deterministic batches, DDP steps, validation with segpipe's own
PQ and AP statistics, and checkpoints that carry everything a resumed run needs."""

from __future__ import annotations

import io
import os
import tempfile
import time
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from pipeline.evaluate import ap as ap_eval
from pipeline.evaluate import pq as pq_eval
from pipeline.models.base import ModelSettings
from pipeline.structures import ImagePrediction, Rle
from pipeline.train.data import Dataset, Example, Sample, decode, read_encoded

MODEL_FILE = "model.pt"  # weights + metadata: what `segpipe infer --weights` loads
STATE_FILE = "state.pt"  # optimiser, schedule and step: what --resume needs besides the weights


@dataclass(frozen=True)
class Plan:
    """Everything a worker needs; the same on every worker."""

    model: str
    settings: ModelSettings
    """How to build the model: --init weights or a seeded random start, thresholds for validation."""
    train: Dataset
    val: Dataset
    steps: int
    batch_size: int
    """Global: each of the W workers takes batch_size / W images per step."""
    learning_rate: float
    """Peak, reached after `warmup` steps, then poly(0.9) decay to 0 at `steps`."""
    warmup: int
    seed: int
    """Seeds the sample stream and flips (the initialisation's seed is in `settings`)."""
    checkpoint_every: int
    """Validate and checkpoint every this many steps, and after the last."""
    log_every: int
    threads: int
    """torch threads per worker (its CPUs)."""
    metadata: dict = field(default_factory=dict)
    """Goes into every checkpoint's model.pt (data fingerprints, code version, run id, settings)."""
    more_train: tuple[Dataset, ...] = ()
    """More human labels (`segpipe review import` outputs): one stream with `train`."""
    pseudo: tuple[Dataset, ...] = ()
    """Pseudo-label sources (`segpipe infer` / `segpipe filter` outputs), trained on beside `train`."""
    pseudo_ratio: float | None = None
    """The share of every batch drawn from `pseudo` (its own stream); None: one stream over all examples."""
    updates: Any = None
    """A `ray.util.queue.Queue` the driver reads rank 0's progress from; None: rank 0 prints it (Ray's logs)."""


def sources(plan: Plan) -> tuple[Dataset, ...]:
    """The training datasets, human labels first: a sample's index counts through them in this order."""
    return (plan.train, *plan.more_train, *plan.pseudo)


def pseudo_per_batch(plan: Plan) -> int:
    return round(plan.pseudo_ratio * plan.batch_size) if plan.pseudo_ratio is not None and plan.pseudo else 0


def sample_index(plan: Plan, position: int) -> tuple[int, bool]:
    """The example at `position` of the run's sample stream (epoch after epoch, each a fresh permutation
    seeded by (seed, epoch)), and whether it is flipped. Independent of the number of workers, so 1 and 2
    workers see the same global batches, and a resumed run sees what the unbroken run would have.

    With a pseudo ratio, the first k = round(ratio x batch) places of every global batch come from the
    pseudo-labels' own stream and the rest from the human labels' stream, so the mix stays fixed however
    many pseudo-labels there are; indices count human examples first."""
    n_human = sum(len(d.examples) for d in (plan.train, *plan.more_train))
    n_pseudo = sum(len(d.examples) for d in plan.pseudo)
    k = pseudo_per_batch(plan)
    if plan.pseudo_ratio is None or not n_pseudo:
        return _stream(plan.seed, (), n_human + n_pseudo, position)
    step, j = divmod(position, plan.batch_size)
    if j < k:
        index, flip = _stream(plan.seed, (2,), n_pseudo, step * k + j)
        return n_human + index, flip
    return _stream(plan.seed, (), n_human, step * (plan.batch_size - k) + j - k)


def _stream(seed: int, salt: tuple[int, ...], n: int, position: int) -> tuple[int, bool]:
    epoch, offset = divmod(position, n)
    order = np.random.default_rng([seed, epoch, *salt]).permutation(n)
    flip = np.random.default_rng([seed, epoch, offset, 1, *salt]).random() < 0.5
    return int(order[offset]), bool(flip)


def learning_rate(plan: Plan, step: int) -> float:
    """Linear warm-up, then polynomial (power 0.9) decay to 0, the Panoptic-DeepLab schedule."""
    if step < plan.warmup:
        return plan.learning_rate * (step + 1) / plan.warmup
    return plan.learning_rate * (1 - (step - plan.warmup) / max(1, plan.steps - plan.warmup)) ** 0.9


def quiet_logs() -> None:
    """Ray worker set-up hook: Ray Train's INFO lines on every report (the whole metrics dict, the
    checkpoint path), its placement-group cleaner's warning every few seconds, without Ray's dashboard,
    that it cannot query actor states (it acts only after a crashed controller), and the traceback of a
    user error are silenced."""
    import logging

    from ray.train.v2._internal import util
    from ray.train.v2._internal.execution import context, storage
    from ray.train.v2._internal.execution.controller import placement_group_cleaner

    for module in (context, storage):
        module.logger.setLevel(logging.WARNING)
    placement_group_cleaner.logger.setLevel(logging.ERROR)
    # A user error (SegpipeError) reaches the driver, which prints it as one line: not its traceback too.
    util.logger.addFilter(lambda record: "pipeline.errors.SegpipeError: " not in record.getMessage())


def train_loop(plan: Plan) -> None:
    """Ray Train's `train_loop_per_worker`."""
    import ray.train
    import torch
    from ray.train.torch import prepare_model

    from pipeline.models import load_model
    from pipeline.train.objectives import objective_for

    context = ray.train.get_context()
    rank, world = context.get_world_rank(), context.get_world_size()
    torch.set_num_threads(plan.threads)
    adapter = load_model(plan.model, plan.settings)
    objective = objective_for(adapter)
    pool = [(dataset, example) for dataset in sources(plan) for example in dataset.examples]
    encoded = [pair for dataset in sources(plan) for pair in read_encoded(dataset, list(dataset.examples))]
    val_examples = list(plan.val.examples[rank::world])
    val_encoded = read_encoded(plan.val, val_examples)
    objective.train_mode()
    module = prepare_model(adapter.module, move_to_device=False)  # DDP over gloo (CPU) or nccl (GPU) when world > 1
    parameters = [p for p in adapter.module.parameters() if p.requires_grad]
    optimizer = objective.optimizer(parameters, plan.learning_rate)
    step, history = _restore(adapter, optimizer)
    if rank == 0 and step:
        _say(plan, f"resumed at step {step} of {plan.steps}", step)
    started, logged = time.perf_counter(), step
    while step < plan.steps:
        for group in optimizer.param_groups:
            group["lr"] = learning_rate(plan, step)
        samples = _batch(plan, pool, encoded, step, rank, world)
        # What the model draws (Mask R-CNN samples anchors and proposals) is seeded by the step, so a resumed
        # run draws what the unbroken one did.
        torch.manual_seed(int(np.random.SeedSequence([plan.seed, step, rank]).generate_state(1)[0]))
        loss, parts = objective.loss(module, samples)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        step += 1
        if rank == 0 and (step % plan.log_every == 0 or step == plan.steps):
            rate = (time.perf_counter() - started) / (step - logged)
            started, logged = time.perf_counter(), step
            _say(plan, f"step {step}/{plan.steps} loss {loss.item():.3f} ("
                 + ", ".join(f"{k} {v:.3f}" for k, v in parts.items()) + f") {rate:.2f} s/step", step)
        if step % plan.checkpoint_every == 0 or step == plan.steps:
            metrics = {"step": step, "loss": float(loss.item()),
                       **validate(adapter, plan.val, val_examples, val_encoded, rank, world)}
            history.append(metrics)
            if rank == 0:
                _say(plan, "validation at step {step}: PQ {pq} AP {ap}".format(
                    step=step, pq=_figure(metrics.get("pq")), ap=_figure(metrics.get("ap"))))
            _report(adapter, optimizer, plan, step, history, metrics, rank)
            objective.train_mode()


def _say(plan: Plan, what: str, step: int | None = None) -> None:
    """Rank 0's progress: to the driver (a report with the step moves its bar), else to this worker's log."""
    if plan.updates is None:
        print(what, flush=True)
    else:
        plan.updates.put((what, step, None if step is None else plan.steps))


def _restore(adapter, optimizer) -> tuple[int, list[dict]]:
    """Weights, optimiser state, step and validation history from the run's latest checkpoint (a resumed
    run), or (0, []) for a fresh one."""
    import ray.train
    import torch

    checkpoint = ray.train.get_checkpoint()
    if checkpoint is None:
        return 0, []
    with checkpoint.as_directory() as folder:
        weights = torch.load(os.path.join(folder, MODEL_FILE), map_location="cpu", weights_only=True)
        state = torch.load(os.path.join(folder, STATE_FILE), map_location="cpu", weights_only=True)
    adapter.module.load_state_dict(weights["model"])
    optimizer.load_state_dict(state["optimizer"])
    return state["step"], weights["history"]


def _batch(plan: Plan, pool: list[tuple[Dataset, Example]], encoded: list, step: int, rank: int,
           world: int) -> list[Sample]:
    """This worker's share of step `step`'s global batch, decoded and (as the stream says) flipped."""
    per_worker = plan.batch_size // world
    samples = []
    for j in range(rank * per_worker, (rank + 1) * per_worker):
        index, flip = sample_index(plan, step * plan.batch_size + j)
        sample = decode(*pool[index], *encoded[index])
        if flip:
            sample.image, sample.ids = sample.image[:, ::-1], sample.ids[:, ::-1]
        samples.append(sample)
    return samples


def _figure(value: float | None) -> str:
    return "n/a" if value is None else f"{value:.4f}"


def _report(adapter, optimizer, plan: Plan, step: int, history: list[dict], metrics: dict, rank: int) -> None:
    """Rank 0 hands Ray Train a checkpoint folder (model.pt, state.pt); Ray persists it to the run's storage."""
    import ray.train
    import torch
    from ray.train import Checkpoint

    if rank != 0:
        ray.train.report(metrics)
        return
    with tempfile.TemporaryDirectory() as folder:
        model = {"model": adapter.module.state_dict(), "model_name": plan.model, "categories": adapter.categories,
                 "step": step, "steps": plan.steps, "val": metrics, "history": history, **plan.metadata}
        for name, obj in ((MODEL_FILE, model), (STATE_FILE, {"optimizer": optimizer.state_dict(), "step": step})):
            buffer = io.BytesIO()
            torch.save(obj, buffer)
            with open(os.path.join(folder, name), "wb") as f:
                f.write(buffer.getvalue())
        ray.train.report(metrics, checkpoint=Checkpoint.from_directory(folder))


# --- validation: the statistics `segpipe eval pq` and `eval ap` add, summed over workers -------------------


def validate(adapter, dataset: Dataset, examples: list[Example], encoded: list, rank: int, world: int,
             batch_size: int = 8) -> dict:
    """PQ (panoptic models on panoptic labels) and mask AP of this worker's share of the validation set,
    gathered on every worker and summed the way `segpipe eval` sums its shards."""
    import torch.distributed as dist

    adapter.module.eval()
    categories = list(dataset.categories)
    pq_index = {c["id"]: i for i, c in enumerate(categories)}
    thing_ids = sorted(c["id"] for c in categories if c.get("isthing"))
    ap_index = {c: i for i, c in enumerate(thing_ids)}
    with_pq = adapter.panoptic and dataset.kind != "instances"
    pq_stats = pq_eval.PQStats.zeros(len(categories))
    truths, results, sizes = [], [], {}
    for start in range(0, len(examples), batch_size):
        chunk = examples[start:start + batch_size]
        samples = [decode(dataset, e, *encoded[start + k]) for k, e in enumerate(chunk)]
        raws = adapter.forward([s.image for s in samples])
        for example, sample, raw in zip(chunk, samples, raws):
            if adapter.panoptic:
                ids, segments = adapter.postprocess.panoptic(raw)
                if with_pq:  # a class the validation labels lack is VOID to them, as `eval pq --drop-unknown-categories`
                    truth = _panoptic_truth(example, sample)
                    pq_stats += pq_eval.image_stats(example.image_id, sample.ids, truth, ids, segments, pq_index,
                                                    dataset.uri, drop_unknown_categories=True)
                prediction = ImagePrediction.from_panoptic(example.image_id, example.file_name, ids, segments)
            else:
                prediction = adapter.postprocess(raw, example.image_id, example.file_name)
            results += [r for r in prediction.to_coco_results() if r["category_id"] in ap_index]
            truths += _instance_truth(dataset, example, sample, ap_index)
            sizes[example.image_id] = (example.height, example.width)
    # `segpipe eval ap`'s own entry points: the same reading, matching and statistics.
    ap_stats = ap_eval.batch_statistics(ap_eval.truth_instances(truths, sizes, ap_index, "segm"),
                                        ap_eval.detection_instances(results, sizes, ap_index, "segm", box_branch=True),
                                        "segm", len(thing_ids))
    if world > 1:
        gathered: list = [None] * world
        dist.all_gather_object(gathered, (pq_stats, ap_stats))
        pq_stats, ap_stats = pq_eval.PQStats.zeros(len(categories)), ap_eval.Statistics.zeros(len(thing_ids))
        for pq_part, ap_part in gathered:  # both add in any order: exact sums, and merges in image-id order
            pq_stats += pq_part
            ap_stats += ap_part
    metrics: dict = {}
    if with_pq:
        summary = pq_eval.summarize(pq_stats, categories)
        metrics.update(pq=summary["All"]["pq"], pq_things=summary["Things"]["pq"], pq_stuff=summary["Stuff"]["pq"],
                       sq=summary["All"]["sq"], rq=summary["All"]["rq"])
    if thing_ids:
        figures = ap_eval.summarize(*ap_eval.accumulate(ap_stats, len(thing_ids)))
        metrics.update(ap=figures[0], ap50=figures[1])
    return metrics


def _panoptic_truth(example: Example, sample: Sample) -> list[dict]:
    """Ground-truth segments with the areas `segpipe eval pq` uses: the JSON's for COCO panoptic labels,
    counted from the pixels for pseudo-labels (whose rows carry them too)."""
    if all("area" in s for s in example.segments):
        return [{**s, "iscrowd": s.get("iscrowd", 0)} for s in example.segments]
    areas = dict(zip(*np.unique(sample.ids, return_counts=True)))
    return [{**s, "area": int(areas.get(s["id"], 0))} for s in sample.segments]


def _instance_truth(dataset: Dataset, example: Example, sample: Sample, ap_index: dict) -> list[dict]:
    """Thing ground truth as COCO instances: the file's annotations, or the thing segments of a panoptic
    map (panopticapi's panoptic-to-detection conversion: mask, box and area from the segment)."""
    if dataset.kind == "instances":
        return [{**a, "image_id": example.image_id} for a in example.segments if a["category_id"] in ap_index]
    truths = []
    for segment in sample.segments:
        if segment["category_id"] in ap_index:
            rle = Rle.from_mask(np.asfortranarray(sample.ids == segment["id"]))
            truths.append({"id": segment["id"], "image_id": example.image_id, "category_id": segment["category_id"],
                           "iscrowd": segment.get("iscrowd", 0), "area": rle.area(), "bbox": list(rle.bbox()),
                           "segmentation": rle.to_coco()})
    return truths

