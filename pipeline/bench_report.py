"""`segpipe bench report`: wall time and peak memory of `segpipe report` on synthetic datasets of several sizes.

Each size gets its own synthetic panoptic split (made once, reused) and two prediction sets made from it by
`synth.perturb_panoptic`; the report (contents, comparison of the two sets with 1,000 resamples, thumbnails)
runs in a fresh process, which reports its own peak RSS and its workers'. Inputs as COCO JSON (+ PNGs), whose
files the driver parses whole (as `segpipe eval` does), or as dataset tables (`segpipe convert`), which it
reads a shard at a time: with tables, memory that does not grow with the images is the point.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

# The child: run the report, then print wall time and peak RSS (its own, and its worker processes').
_CHILD = """
import json, resource, sys, time
from pipeline.progress import lines
from pipeline.report import ReportConfig, run
config = ReportConfig(**json.loads(sys.argv[1]))
start = time.perf_counter()
run(config, progress=lines())
wall = time.perf_counter() - start
print(json.dumps({"wall_s": wall, "peak_rss_mib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
                  "workers_peak_rss_mib": resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / 1024}))
"""


def prepare(data: Path, images: int, height: int, width: int) -> dict:
    """A synthetic val split of `images` images and two prediction sets (made once, then reused)."""
    from pipeline.synth import SynthConfig, write_dataset, write_perturbed_panoptic

    marker = data / "ready.json"
    wanted = {"images": images, "height": height, "width": width}
    gt, pred, compare = (str(data / "annotations" / "panoptic_val.json"), str(data / "pred.json"), str(data / "compare.json"))
    if not (marker.exists() and json.loads(marker.read_text()) == wanted):
        shutil.rmtree(data, ignore_errors=True)
        write_dataset(str(data), SynthConfig(images=images, split="val", seed=0, height=height, width=width,
                                             workers=os.cpu_count() or 1))
        write_perturbed_panoptic(gt, pred, seed=1)
        write_perturbed_panoptic(gt, compare, seed=2)
        marker.write_text(json.dumps(wanted))
    return {"dataset": gt, "pred": pred, "compare": compare, "images": str(data / "val")}


def as_tables(inputs: dict, data: Path) -> dict:
    """The same inputs as dataset tables (`segpipe convert`, made once)."""
    from pipeline.convert import convert

    tables = {}
    for key in ("dataset", "pred", "compare"):
        folder = data / f"{key}-table"
        if not (folder / "segments.parquet").exists():
            convert(inputs[key], str(folder))
        tables[key] = str(folder)
    return {**inputs, **tables}


def measure(inputs: dict, out: Path, workers: int, shard_size: int) -> dict:
    """One report in a fresh process: its wall time (imports excluded) and peak memory."""
    config = {**inputs, "out": str(out), "workers": workers, "shard_size": shard_size}
    done = subprocess.run([sys.executable, "-c", _CHILD, json.dumps(config)], capture_output=True, text=True, check=False)
    if done.returncode:
        raise RuntimeError(f"the report failed: {done.stderr.strip().splitlines()[-1] if done.stderr.strip() else done.returncode}")
    return json.loads(done.stdout.strip().splitlines()[-1])


def run(data: Path, sizes: list[int], height: int, width: int, workers: int, shard_size: int, out: Path,
        inputs: tuple[str, ...] = ("json", "tables"), echo=print) -> dict:
    """Measure every size and input form ("json", "tables"); writes `out` (JSON) and returns it."""
    results = []
    for images in sizes:
        echo(f"bench report: preparing {images:,} images of {height}x{width} (made once)")
        folder = data / f"{images}-{height}x{width}"
        files = prepare(folder, images, height, width)
        for form in inputs:
            given = as_tables(files, folder) if form == "tables" else files
            echo(f"bench report: {images:,} images, {form}")
            figures = measure(given, data / f"report-{images}-{form}", workers, shard_size)
            results.append({"images": images, "inputs": form, **figures})
            echo(f"  {figures['wall_s']:.1f} s, peak RSS {figures['peak_rss_mib']:.0f} MiB"
                 + (f" (workers {figures['workers_peak_rss_mib']:.0f} MiB)" if workers > 1 else ""))
    report = {"height": height, "width": width, "workers": workers, "shard_size": shard_size,
              "sections": "health (labels, masks, image files, duplicates), contents, model errors (PQ, AP, TIDE, "
                          "confusion, calibration, label-error candidates), comparison of two prediction sets (1,000 "
                          "resamples), thumbnails",
              "cpus": os.cpu_count(), "results": results}
    out.write_text(json.dumps(report, indent=2))
    return report
