"""`segpipe bench eval`: segpipe's AP, PQ and mIoU against the reference tools, like for like, in one run.

Every measurement runs in a fresh Python process pinned to the same cores: its imports happen before
the clock, reading the input files is inside it, and it stops when the numbers are in hand. The
median of `repeat` runs is reported with each row's numbers checked against the reference tool's
(pycocotools for AP, hotcoco's panopticapi port for PQ, torchmetrics for mIoU). The inputs are
described in `pipeline.bench_data`.
"""

from __future__ import annotations

import contextlib
import io
import json
import os
import resource
import statistics
import subprocess
import sys
import time
from pathlib import Path

from pipeline.bench_data import SHAPES, prepare_instances, prepare_panoptic, prepare_panoptic_shape

# (tool, input) per task; the first is the reference the numbers are checked against.
CASES = {
    "ap": [("pycocotools", "json"), ("faster-coco-eval", "json"), ("hotcoco", "json"), ("segpipe", "json"),
           ("segpipe", "json+pred-table"), ("segpipe", "tables")],
    "pq": [("hotcoco", "png"), ("segpipe", "png"), ("segpipe", "png+pred-table"), ("segpipe", "tables")],
    "miou": [("torchmetrics", "label-png"), ("segpipe", "label-png"), ("segpipe", "panoptic")],
}
SPEED_AGAINST = {"ap": ("pycocotools", "hotcoco"), "pq": ("hotcoco",), "miou": ("torchmetrics",)}
MISMATCH = 1e-9  # numbers further than this from the reference's are flagged
TARGETS = [  # (what, task, tool, input, against, at least): the issue's "Done means"
    ("PQ from tables vs hotcoco's PNG path", "pq", "segpipe", "tables", "hotcoco", 3.0),
    ("AP from JSON vs pycocotools", "ap", "segpipe", "json", "pycocotools", 10.0),
    ("AP from a predictions table vs pycocotools", "ap", "segpipe", "json+pred-table", "pycocotools", 10.0),
    ("AP from tables (GT too) vs pycocotools", "ap", "segpipe", "tables", "pycocotools", 10.0),
]


def plan(tasks: list[str], shapes: list[str], workers: list[int], tools: set[str] | None = None,
         threads: list[int] = (1,)) -> list[dict]:
    """The measurements: task entries are ap (every shape), ap-SHAPE, pq (synth and every shape), pq-SHAPE or miou.
    Reference tools are always kept. segpipe runs with each worker count and, in-process, each thread count
    (0: every core the process may use); the other tools use the threads they choose."""
    specs = []
    for entry in tasks:
        task, _, shape = entry.partition("-")
        if task not in CASES or (shape and (shape not in SHAPES or task == "miou")):
            raise ValueError(f"--tasks {entry!r}: use ap, pq, {', '.join(t + '-' + s for t in ('ap', 'pq') for s in SHAPES)} or miou")
        variants = ([(s, iou) for s in ([shape] if shape else shapes) for iou in ("segm", "bbox")] if task == "ap"
                    else [(s, None) for s in ([shape] if shape else ["synth", *shapes])] if task == "pq"
                    else [("synth", None)])
        for shape_name, iou_type in variants:
            for k, (tool, kind) in enumerate(CASES[task]):
                if k and tools is not None and tool not in tools and f"{tool}:{kind}" not in tools:
                    continue
                for w in workers if tool == "segpipe" else [1]:
                    for t in threads if tool == "segpipe" and w == 1 else [0]:
                        specs.append({"task": task, "shape": shape_name, "iou_type": iou_type, "tool": tool,
                                      "input": kind, "workers": w, "threads": t})
    return specs


def run(data: Path, images: int, height: int, width: int, repeat: int, workers: list[int], out: Path | None,
        tasks: list[str] = ("ap", "pq", "miou"), shapes: list[str] = tuple(SHAPES), tools: set[str] | None = None,
        echo=print, threads: list[int] = (1,)) -> dict:
    """Prepare the data, run every planned measurement `repeat` times in fresh processes, report medians."""
    specs = plan(list(tasks), list(shapes), workers, tools, list(threads))
    start = time.perf_counter()
    paths = {}  # (task, shape) -> that measurement's input files
    for shape in sorted({s["shape"] for s in specs if s["task"] == "ap"}):
        paths["ap", shape] = prepare_instances(data / f"instances-{shape}", shape, images, height, width)
    for shape in sorted({s["shape"] for s in specs if s["task"] == "pq" and s["shape"] != "synth"}):
        paths["pq", shape] = prepare_panoptic_shape(data / f"panoptic-{shape}", shape, images, height, width)
    if any(s["task"] in ("pq", "miou") and s["shape"] == "synth" for s in specs):
        paths["pq", "synth"] = paths["miou", "synth"] = prepare_panoptic(data / "panoptic", images, height, width)
    echo(f"data ready in {time.perf_counter() - start:.0f} s: {images} images of {height}x{width} in {data}")
    cpus = sorted(os.sched_getaffinity(0))
    _warm_up(specs, paths, cpus)
    rows = []
    for spec in specs:
        runs = [_child(spec, paths[spec["task"], spec["shape"]], cpus) for _ in range(repeat)]
        rows.append(_row(spec, runs, images))
        echo(_line(rows[-1]))
    compare(rows)
    report = {"images": images, "size": [height, width], "repeat": repeat, "cpus": cpus,
              "python": sys.version.split()[0], "rows": rows, "targets": targets(rows)}
    if out:
        out.write_text(json.dumps(report, indent=1))
    echo(table(report))
    return report


def _warm_up(specs: list[dict], paths: dict, cpus: list[int]) -> None:
    """One untimed segpipe run per (task, input): numba compiles its kernels into its on-disk cache on first
    use, once per install, and a timed run then loads them (inside the clock, as every real run does)."""
    seen = set()
    for spec in specs:
        if spec["tool"] == "segpipe" and (spec["task"], spec["input"]) not in seen:
            seen.add((spec["task"], spec["input"]))
            _child(spec, paths[spec["task"], spec["shape"]], cpus)


def _row(spec: dict, runs: list[dict], images: int) -> dict:
    failed = next((r["error"] for r in runs if "error" in r), None)
    row = {**spec, "images": images}
    if failed:
        return {**row, "error": failed, "numbers": None}
    seconds = statistics.median(r["seconds"] for r in runs)
    retried = [r["retried_after"] for r in runs if "retried_after" in r]
    row.update({"retried_after": retried} if retried else {})
    return {**row, "seconds": seconds, "runs_seconds": [r["seconds"] for r in runs], "images_per_s": images / seconds,
            "cpu_seconds": statistics.median(r["cpu_seconds"] for r in runs),
            "peak_rss_mb": max(r["peak_rss_mb"] for r in runs), "numbers": runs[0]["numbers"]}


def compare(rows: list[dict]) -> None:
    """Adds speed_vs_TOOL (that tool's median seconds / the row's) and max_abs_diff against the reference."""
    def group(row):
        return row["task"], row["shape"], row["iou_type"]

    for row in rows:
        if row["numbers"] is None:
            continue
        for tool in SPEED_AGAINST[row["task"]]:
            other = next((r for r in rows if group(r) == group(row) and r["tool"] == tool and r["numbers"] is not None), None)
            if other is not None:
                row[f"speed_vs_{tool}"] = other["seconds"] / row["seconds"]
        reference_tool, reference_input = CASES[row["task"]][0]
        reference = next((r for r in rows if group(r) == group(row) and r["tool"] == reference_tool
                          and r["input"] == reference_input and r["numbers"] is not None), None)
        if reference is not None:
            row["reference"] = reference_tool
            row["max_abs_diff"] = max(abs(a - b) for a, b in zip(row["numbers"], reference["numbers"]))
            row["mismatch"] = len(row["numbers"]) != len(reference["numbers"]) or row["max_abs_diff"] > MISMATCH


def targets(rows: list[dict]) -> list[dict]:
    """The issue's targets, each checked on every shape and IoU type (and thread count) it was measured on
    with one worker."""
    found = []
    for what, task, tool, kind, against, least in TARGETS:
        for row in rows:
            if (row["task"], row["tool"], row["input"], row["workers"]) == (task, tool, kind, 1) and row["numbers"]:
                speed = row.get(f"speed_vs_{against}")
                if speed is not None:
                    found.append({"target": what, "shape": row["shape"], "iou_type": row["iou_type"],
                                  "threads": row["threads"], "speed": speed, "at_least": least, "met": speed >= least})
    return found


def _line(row: dict) -> str:
    name = (f"{row['task']:4} {row['shape']:5} {row['iou_type'] or '':4} {row['tool']:16} {row['input']:15} "
            f"w={row['workers']} t={_threads(row)}")
    if row["numbers"] is None:
        return f"{name}  FAILED: {row['error']}"
    return f"{name}  {row['seconds']:7.2f} s  (cpu {row['cpu_seconds']:6.2f} s)  {row['peak_rss_mb']:6.0f} MB"


def table(report: dict) -> str:
    """The rows as a fixed-width table; speeds are the other tool's median seconds over the row's."""
    lines = [f"{'task':4} {'shape':5} {'iou':4} {'tool':16} {'input':15} {'w':>2} {'t':>3} {'seconds':>8} {'img/s':>8} "
             f"{'cpu s':>7} {'peak MB':>7} {'vs ref':>7} {'vs hot':>7} {'max diff':>8}"]
    for r in report["rows"]:
        name = (f"{r['task']:4} {r['shape']:5} {r['iou_type'] or '':4} {r['tool']:16} {r['input']:15} {r['workers']:>2} "
                f"{_threads(r):>3}")
        if r["numbers"] is None:
            lines.append(f"{name} FAILED: {r['error'].split(': ', 1)[-1][:90]}")
            continue
        reference = CASES[r["task"]][0][0]
        vs_ref = r.get(f"speed_vs_{reference}")
        vs_hot = r.get("speed_vs_hotcoco") if r["task"] == "ap" else None
        lines.append(f"{name} {r['seconds']:8.3f} {r['images_per_s']:8.1f} {r['cpu_seconds']:7.3f} {r['peak_rss_mb']:7.0f} "
                     f"{_x(vs_ref)} {_x(vs_hot)} {r.get('max_abs_diff', float('nan')):8.1e}"
                     + ("  MISMATCH" if r.get("mismatch") else ""))
    lines.append("(vs ref: speed against pycocotools for AP, hotcoco for PQ, torchmetrics for mIoU; vs hot: against "
                 "hotcoco's AP; cpu s: CPU time of all the process's threads, above seconds where a tool used more than one of "
                 f"the {len(report['cpus'])} pinned cores; max diff: of the numbers, against the reference's)")
    lines += [f"target {t['target']} ({t['shape']}{' ' + t['iou_type'] if t['iou_type'] else ''}, "
              f"{_threads(t)} threads): "
              f"{t['speed']:.1f}x, at least {t['at_least']:.0f}x: {'met' if t['met'] else 'NOT MET'}"
              for t in report["targets"]]
    return "\n".join(lines)


def _threads(row: dict) -> str:
    return str(row["threads"]) if row["threads"] else "all"


def _x(speed: float | None) -> str:
    return f"{speed:6.2f}x" if speed is not None else f"{'-':>7}"


# --- one measurement, in a fresh process ------------------------------------------------------------


def _child(spec: dict, paths: dict, cpus: list[int], tries: int = 2) -> dict:
    """Run one measurement in a fresh interpreter on `cpus`; a failure is recorded, not raised. A process that
    fails is run once more (a shared machine, a rare crash at exit: see map_shards' known issue), and the
    first failure stays in the result ("retried_after"), so a number that needed a second try says so."""
    arguments = json.dumps({**spec, "paths": {k: str(v) for k, v in paths.items()}, "cpus": cpus})
    done = subprocess.run([sys.executable, "-m", "pipeline.bench", arguments], capture_output=True, text=True)
    if done.returncode != 0:
        lines = done.stderr.strip().splitlines() or [f"exit code {done.returncode}"]
        error = f"exit code {done.returncode}: {lines[-1]}"
        if tries > 1:
            again = _child(spec, paths, cpus, tries - 1)
            if "error" in again:
                return {"error": f"{error}; again: {again['error']}"}
            return {**again, "retried_after": error}
        return {"error": error}
    return json.loads(done.stdout.strip().splitlines()[-1])


def measure(spec: dict) -> dict:
    """One run in this process: seconds from reading the inputs to the numbers, and peak memory."""
    os.sched_setaffinity(0, spec["cpus"])
    paths = spec["paths"]
    _import(spec["task"], spec["tool"])
    start, cpu_start = time.perf_counter(), time.process_time()
    with contextlib.redirect_stdout(io.StringIO()):  # pycocotools and hotcoco print their summaries
        if spec["task"] == "ap":
            numbers = _ap(spec["tool"], spec["input"], spec["iou_type"], paths, spec["workers"], spec["threads"])
        elif spec["task"] == "pq":
            numbers = _pq(spec["tool"], spec["input"], paths, spec["workers"], spec["threads"])
        else:
            numbers = _miou(spec["tool"], spec["input"], paths, spec["workers"], spec["threads"])
    seconds, cpu_seconds = time.perf_counter() - start, time.process_time() - cpu_start
    return {"seconds": seconds, "cpu_seconds": cpu_seconds, "peak_rss_mb": _peak_rss_mb(),
            "numbers": [float(v) for v in numbers]}


def _import(task: str, tool: str) -> None:
    if tool == "segpipe":
        import pipeline.evaluate.ap, pipeline.evaluate.miou, pipeline.evaluate.pq, pipeline.io.tables  # noqa: E401, F401
    elif tool == "pycocotools":
        import pycocotools.coco, pycocotools.cocoeval  # noqa: E401, F401
    elif tool == "faster-coco-eval":
        import faster_coco_eval  # noqa: F401
    elif tool == "torchmetrics":
        import PIL.Image, torch, torchmetrics.classification  # noqa: E401, F401
    else:
        import hotcoco, hotcoco.panoptic  # noqa: E401, F401


def _peak_rss_mb() -> float:
    """This process's peak resident memory (VmHWM; ru_maxrss would carry the parent's over exec)."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 1024
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def _ap(tool: str, kind: str, iou_type: str, paths: dict, workers: int, threads: int | None) -> list[float]:
    if tool == "segpipe":
        from pipeline.evaluate.ap import evaluate_ap

        gt = paths["gt_table"] if kind == "tables" else paths["instances"]
        pred = paths["results"] if kind == "json" else paths["pred_table"]
        return evaluate_ap(gt, pred, iou_type, workers=workers, threads=threads)["stats"]
    if tool == "pycocotools":
        from pycocotools.coco import COCO
        from pycocotools.cocoeval import COCOeval
    elif tool == "faster-coco-eval":
        from faster_coco_eval import COCO
        from faster_coco_eval import COCOeval_faster as COCOeval
    else:
        from hotcoco import COCO, COCOeval
    coco = COCO(paths["instances"])
    evaluator = COCOeval(coco, coco.loadRes(paths["results"]), iou_type)
    evaluator.evaluate()
    evaluator.accumulate()
    evaluator.summarize()
    return list(evaluator.stats)


def _pq(tool: str, kind: str, paths: dict, workers: int, threads: int | None) -> list[float]:
    if tool == "hotcoco":
        from hotcoco import panoptic

        result = panoptic.pq_compute(paths["panoptic"], paths["panoptic_pred"])
    else:
        from pipeline.evaluate.pq import evaluate_pq

        gt = paths["panoptic_gt_table"] if kind == "tables" else paths["panoptic"]
        pred = paths["panoptic_pred"] if kind == "png" else paths["panoptic_pred_table"]
        result = evaluate_pq(gt, pred, workers=workers, threads=threads)
    return [result[g][m] for g in ("All", "Things", "Stuff") for m in ("pq", "sq", "rq")]


def _miou(tool: str, kind: str, paths: dict, workers: int, threads: int | None) -> list[float]:
    if tool == "torchmetrics":
        return _torchmetrics_miou(Path(paths["labels_gt"]), Path(paths["labels_pred"]), Path(paths["classes"]))
    from pipeline.evaluate.miou import evaluate_miou

    if kind == "panoptic":
        result = evaluate_miou(paths["panoptic"], paths["panoptic_pred"], workers=workers, threads=threads)
    else:
        result = evaluate_miou(paths["labels_gt"], paths["labels_pred"], classes=paths["classes"], workers=workers,
                               threads=threads)
    return [result[k] for k in ("mIoU", "fwIoU", "aAcc", "mAcc")]


def _torchmetrics_miou(gt_dir: Path, pred_dir: Path, classes: Path) -> list[float]:
    """MulticlassJaccardIndex over the label PNGs; the means in float64 from its (exact, integer) confusion matrix.

    A predicted VOID pixel (255) becomes an extra class K, so that it counts against the ground truth's
    class as in segpipe (torchmetrics has no VOID prediction). torchmetrics' own float32 mIoU is checked
    against the float64 one.
    """
    import numpy as np
    import torch
    from PIL import Image
    from torchmetrics.classification import MulticlassJaccardIndex

    k = len(json.loads(classes.read_text()))
    metric = MulticlassJaccardIndex(num_classes=k + 1, average="macro", ignore_index=255)
    for gt_png in sorted(gt_dir.glob("*.png")):
        gt = np.asarray(Image.open(gt_png), np.int64)
        pred = np.asarray(Image.open(pred_dir / gt_png.name), np.int64).copy()
        pred[pred == 255] = k
        metric.update(torch.from_numpy(pred), torch.from_numpy(gt))
    own = float(metric.compute())
    matrix = metric.confmat.double().numpy()[:k]  # rows: ground truth (never K); columns: K classes + VOID
    tp = np.diagonal(matrix[:, :k])
    gt_pixels, predicted = matrix.sum(axis=1), matrix[:, :k].sum(axis=0)
    union = gt_pixels + predicted - tp
    scored = union > 0
    iou = tp[scored] / union[scored]
    total = gt_pixels.sum()
    numbers = [float(iou.mean()), float((gt_pixels[scored] / total * iou).sum()), float(tp.sum() / total),
               float((tp[gt_pixels > 0] / gt_pixels[gt_pixels > 0]).mean())]
    full = metric.confmat.double().numpy()  # torchmetrics' macro mean counts class K (VOID) at IoU 0 where predicted
    full_union = full.sum(axis=0) + full.sum(axis=1) - np.diagonal(full)
    if abs(own - float(np.mean(np.diagonal(full)[full_union > 0] / full_union[full_union > 0]))) > 1e-5:
        raise RuntimeError(f"torchmetrics' own mIoU {own} differs from {numbers[0]}")
    return numbers


if __name__ == "__main__":  # one measurement, in a fresh process (see _child)
    print(json.dumps(measure(json.loads(sys.argv[1]))))
