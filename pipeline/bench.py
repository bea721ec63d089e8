"""`segpipe bench eval`: segpipe's PQ and AP against the reference tools, side by side in one run.

Each measurement runs in a fresh Python process (so peak memory is that tool's alone), timed from
reading the inputs to having the numbers; imports are not timed. The median of `repeat` runs is
reported, with every tool's numbers checked against the reference (pycocotools for AP, hotcoco's
panopticapi port for PQ).
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

AP_TOOLS = ("pycocotools", "faster-coco-eval", "hotcoco", "segpipe")
PQ_TOOLS = ("hotcoco", "segpipe", "segpipe-parquet")


def prepare(data: Path, images: int, height: int, width: int, seed: int = 0) -> dict:
    """Synthetic COCO-val-shaped data (made once, reused): GT, AP results, PQ predictions."""
    import numpy as np

    from pipeline.synth import SynthConfig, perturb_instances, write_dataset, write_perturbed_panoptic

    paths = {"instances": data / "annotations" / "instances_val.json",
             "panoptic": data / "annotations" / "panoptic_val.json",
             "results": data / "results_val.json",
             "panoptic_pred": data / "predictions" / "panoptic_pred.json",
             "parquet": data / "predictions" / "table"}
    marker = data / "ready.json"
    wanted = {"images": images, "height": height, "width": width, "seed": seed}
    if marker.exists() and json.loads(marker.read_text()) == wanted:
        return paths
    write_dataset(str(data), SynthConfig(images=images, split="val", seed=seed, height=height, width=width,
                                         workers=os.cpu_count() or 1))
    gt = json.loads(paths["instances"].read_text())
    results = perturb_instances(gt, np.random.default_rng(seed), fill_to=100)
    paths["results"].write_text(json.dumps(results))
    write_perturbed_panoptic(str(paths["panoptic"]), str(paths["panoptic_pred"]), seed)
    _panoptic_table(paths["panoptic_pred"], paths["parquet"])
    marker.write_text(json.dumps(wanted))
    return paths


def _panoptic_table(pred_json: Path, out: Path, images_per_file: int = 500) -> None:
    """The panoptic predictions as the project's Parquet table (RLE rows, no PNGs)."""
    from pipeline.io.tables import write_predictions
    from pipeline.structures import ImagePrediction, decode_panoptic_png

    data = json.loads(pred_json.read_text())
    folder = pred_json.with_suffix("")
    batch = []
    for index, a in enumerate(data["annotations"]):
        ids = decode_panoptic_png((folder / a["file_name"]).read_bytes(), a["file_name"])
        batch.append(ImagePrediction.from_panoptic(a["image_id"], a["file_name"], ids, a["segments_info"]))
        if len(batch) == images_per_file or index == len(data["annotations"]) - 1:
            write_predictions(str(out / f"part-{index // images_per_file:05d}.parquet"), batch, "bench", "perturb")
            batch = []


def measure(task: str, tool: str, paths: dict, workers: int) -> dict:
    """One run in this process: seconds and the resulting numbers. Imports happen before the clock."""
    _import(tool)
    start = time.perf_counter()
    with contextlib.redirect_stdout(io.StringIO()):
        if task.startswith("ap-"):
            numbers = _ap(tool, task[3:], str(paths["instances"]), str(paths["results"]), workers)
        else:
            numbers = _pq(tool, str(paths["panoptic"]), str(paths["panoptic_pred"]), str(paths["parquet"]), workers)
    seconds = time.perf_counter() - start
    return {"seconds": seconds, "peak_rss_mb": _peak_rss_mb(), "numbers": [float(v) for v in numbers]}


def _import(tool: str) -> None:
    if tool.startswith("segpipe"):
        import pipeline.evaluate.ap, pipeline.evaluate.pq, pipeline.evaluate.runner, pipeline.io.tables  # noqa: E401, F401
    elif tool == "pycocotools":
        import pycocotools.coco, pycocotools.cocoeval  # noqa: E401, F401
    elif tool == "faster-coco-eval":
        import faster_coco_eval  # noqa: F401
    else:
        import hotcoco.panoptic  # noqa: F401


def _peak_rss_mb() -> float:
    """This process's peak resident memory (VmHWM; ru_maxrss would carry the parent's over exec)."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 1024
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def _ap(tool: str, iou_type: str, gt: str, results: str, workers: int) -> list[float]:
    if tool == "segpipe":
        from pipeline.evaluate.ap import evaluate_ap

        return evaluate_ap(gt, results, iou_type, workers=workers)["stats"]
    if tool == "pycocotools":
        from pycocotools.coco import COCO
        from pycocotools.cocoeval import COCOeval
    elif tool == "faster-coco-eval":
        from faster_coco_eval import COCO
        from faster_coco_eval import COCOeval_faster as COCOeval
    else:
        from hotcoco import COCO, COCOeval
    coco = COCO(gt)
    evaluator = COCOeval(coco, coco.loadRes(results), iou_type)
    evaluator.evaluate()
    evaluator.accumulate()
    evaluator.summarize()
    return list(evaluator.stats)


def _pq(tool: str, gt: str, pred: str, parquet: str, workers: int) -> list[float]:
    if tool == "hotcoco":
        from hotcoco import panoptic

        result = panoptic.pq_compute(gt, pred)
    else:
        from pipeline.evaluate.pq import evaluate_pq

        result = evaluate_pq(gt, parquet if tool == "segpipe-parquet" else pred, workers=workers)
    return [result[g][m] for g in ("All", "Things", "Stuff") for m in ("pq", "sq", "rq")]


def run(data: Path, images: int, height: int, width: int, repeat: int, workers: list[int], out: Path | None,
        echo=print) -> dict:
    """Prepare the data, run every (task, tool, workers) `repeat` times in fresh processes, report medians."""
    start = time.perf_counter()
    paths = prepare(data, images, height, width)
    echo(f"data ready in {time.perf_counter() - start:.0f} s: {images} images of {height}x{width} in {data}")
    plan = [(f"ap-{t}", tool, w) for t in ("segm", "bbox") for tool in AP_TOOLS for w in (workers if tool == "segpipe" else [1])]
    plan += [("pq", tool, w) for tool in PQ_TOOLS for w in (workers if tool.startswith("segpipe") else [1])]
    rows = []
    for task, tool, w in plan:
        runs = [_child(task, tool, paths, w) for _ in range(repeat)]
        row = {"task": task, "tool": tool, "workers": w, "images": images,
               "seconds": statistics.median(r["seconds"] for r in runs),
               "runs_seconds": [r["seconds"] for r in runs],
               "peak_rss_mb": max(r["peak_rss_mb"] for r in runs), "numbers": runs[0]["numbers"]}
        row["images_per_s"] = images / row["seconds"]
        rows.append(row)
        echo(f"{task:8} {tool:17} workers={w}  {row['seconds']:7.2f} s  {row['images_per_s']:7.1f} img/s  "
             f"{row['peak_rss_mb']:6.0f} MB")
    for task in {r["task"] for r in rows}:
        reference_tool = "pycocotools" if task.startswith("ap-") else "hotcoco"
        reference = next(r for r in rows if r["task"] == task and r["tool"] == reference_tool)
        for r in rows:
            if r["task"] == task:
                r["speed_vs_" + reference_tool] = reference["seconds"] / r["seconds"]
                r["max_abs_diff_vs_" + reference_tool] = max(abs(a - b) for a, b in zip(r["numbers"], reference["numbers"]))
    report = {"images": images, "size": [height, width], "repeat": repeat, "cpus": os.cpu_count(), "rows": rows}
    if out:
        out.write_text(json.dumps(report, indent=1))
    echo(table(report))
    return report


def table(report: dict) -> str:
    lines = [f"{'task':8} {'tool':17} {'workers':>7} {'seconds':>8} {'img/s':>8} {'peak MB':>8} {'speed x':>8} {'max diff':>9}"]
    for r in report["rows"]:
        speed = r.get("speed_vs_pycocotools", r.get("speed_vs_hotcoco"))
        diff = r.get("max_abs_diff_vs_pycocotools", r.get("max_abs_diff_vs_hotcoco"))
        lines.append(f"{r['task']:8} {r['tool']:17} {r['workers']:>7} {r['seconds']:8.2f} {r['images_per_s']:8.1f} "
                     f"{r['peak_rss_mb']:8.0f} {speed:8.2f} {diff:9.1e}")
    return "\n".join(lines) + "\n(speed x: against pycocotools for AP, hotcoco for PQ; max diff: of the reported numbers)"


def _child(task: str, tool: str, paths: dict, workers: int) -> dict:
    arguments = json.dumps({"task": task, "tool": tool, "workers": workers, "paths": {k: str(v) for k, v in paths.items()}})
    done = subprocess.run([sys.executable, "-m", "pipeline.bench", arguments], capture_output=True, text=True)
    if done.returncode != 0:
        raise RuntimeError(f"{task} with {tool} failed:\n{done.stderr[-2000:]}")
    return json.loads(done.stdout.strip().splitlines()[-1])


if __name__ == "__main__":  # one measurement, in a fresh process (see _child)
    spec = json.loads(sys.argv[1])
    result = measure(spec["task"], spec["tool"], {k: Path(v) for k, v in spec["paths"].items()}, spec["workers"])
    print(json.dumps(result))
